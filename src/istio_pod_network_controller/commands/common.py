"""The command-line plumbing the subcommands share: a parser that raises instead of exiting, the
types of number arguments, the one-line error, the namespaces never touched, and the stop signal.

Kept free of the agent, the spec layer and asyncio: ``init``, which starts in every meshed pod,
imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from ..cli import EXIT_INVALID, EXIT_OK, PROG

if TYPE_CHECKING:
    import asyncio

# Larger is a typo, not a wish (and would overflow the event loop's timers).
MAX_SECONDS = 1e9
MAX_COUNT = 2**31 - 1


class UsageError(Exception):
    """A command line argparse refuses; the message is argparse's, one line."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing its usage and exiting, so
    that every subcommand reports a bad command line as its own one line with exit status 2, and
    ``main(argv)`` can be called in process."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def wants_help(argv: Sequence[str]) -> bool:
    """``-h``/``--help`` anywhere: the caller prints its help and returns 0 (argparse would exit)."""
    return any(a in ("-h", "--help") for a in argv)


def parse(command: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """The parsed command line, or the exit status to return: 0 once the help is printed, 2 once
    the one line saying what is wrong is."""
    if wants_help(argv):
        parser.print_help()
        return EXIT_OK
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        return fail(command, exc)


def fail(command: str, problem: object, code: int = EXIT_INVALID) -> int:
    """Print ``PROG COMMAND: PROBLEM`` on stderr and return ``code``: how every subcommand says
    why it cannot go on."""
    print(f"{PROG} {command}: {problem}", file=sys.stderr)
    return code


# -- argument types (argparse names the flag in front of the message) ---------------------------


def seconds(text: str) -> float:
    """A number of seconds, 0 included."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < MAX_SECONDS:  # NaN included
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0 to {MAX_SECONDS:g}: {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A number of seconds greater than 0."""
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def count(text: str) -> int:
    """A whole number greater than 0."""
    if not (text.isascii() and text.isdigit() and 0 < int(text) <= MAX_COUNT):
        raise argparse.ArgumentTypeError(f"a whole number above 0: {text!r}")
    return int(text)


def port(text: str) -> int:
    """A TCP port, 0 included (any free one)."""
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)


# -- settings more than one subcommand takes -----------------------------------------------------


def excluded_namespaces(listed: str) -> tuple[str, ...]:
    """The namespaces never touched: kube-system, the comma list ``listed`` (a flag's value), and
    the controller's own (``POD_NAMESPACE``, from the downward API). The agent and the webhook
    must be given the same list."""
    from ..decide import DEFAULT_EXCLUDED_NAMESPACES  # not at import: ``init`` loads this module

    names = [*DEFAULT_EXCLUDED_NAMESPACES, *(n.strip() for n in listed.split(",") if n.strip())]
    if os.environ.get("POD_NAMESPACE"):
        names.append(os.environ["POD_NAMESPACE"])
    return tuple(dict.fromkeys(names))


def stop_requested() -> asyncio.Event:
    """An event of the running loop, set on SIGTERM or SIGINT (how Kubernetes and a terminal stop
    a process): the long-running commands then drain instead of dying mid-write."""
    import asyncio  # not at import: ``init`` loads this module and has no event loop
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
