"""`init`: the waiting init container's entry point (see ``waiter``).

Imports only the waiter and the pure spec layer, so it starts fast in every meshed pod. Prints
progress to stderr and exactly one closing line: on stdout when the pod may start, on stderr
when it may not (with ``terminationMessagePolicy: FallbackToLogsOnError`` that line becomes the
container's termination message, without writing a file).
"""

from __future__ import annotations

import argparse
import sys

from .. import names
from ..cli import EXIT_FAILURE, EXIT_OK, PROG
from ..waiter import DEFAULT_TIMEOUT, DEFAULT_VERIFY_TIMEOUT, Options, run
from .common import Parser, parse, positive_seconds

PREFIX = f"{PROG} {names.WAITER_SUBCOMMAND}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PREFIX,
        description=(
            "Wait until the node agent has programmed this pod's network namespace "
            f"({names.STATUS}={names.STATUS_INITIALIZED} for this container's namespace), then exit 0. "
            "Exit 1 on the agent's error, a timeout or a failed --verify; 2 on invalid input."
        ),
        allow_abbrev=False,
    )
    parser.add_argument(
        "--file",
        default=names.ANNOTATIONS_FILE,
        metavar="PATH",
        help=f"the downward API annotations file (default {names.ANNOTATIONS_FILE})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after the mark, prove that outbound traffic reaches the proxy port, with the probe the "
        "agent planned in its mark (skipped, saying why, when it planned none for this UID/GID)",
    )
    parser.add_argument(
        "--verify-timeout",
        type=positive_seconds,
        default=DEFAULT_VERIFY_TIMEOUT,
        metavar="SECONDS",
        help=f"how long the --verify connection may take (default {DEFAULT_VERIFY_TIMEOUT:g})",
    )
    return parser


def _log(line: str) -> None:
    print(f"{PREFIX}: {line}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    args = parse(names.WAITER_SUBCOMMAND, build_parser(), argv)
    if isinstance(args, int):
        return args
    options = Options(
        file=args.file, timeout=args.timeout, verify=args.verify, verify_timeout=args.verify_timeout
    )
    try:
        code, line = run(options, log=_log)
    except Exception as exc:  # a bug or an unforeseen OS error: still one line, and a failure
        code, line = EXIT_FAILURE, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
    print(f"{PREFIX}: {line}", file=sys.stdout if code == EXIT_OK else sys.stderr, flush=True)
    return code
