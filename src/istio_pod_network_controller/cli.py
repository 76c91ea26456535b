"""Command line entry point: dispatch to one module per subcommand.

Each subcommand owns its argument parser (``commands/<name>.py``, functions ``main(argv)`` and
``build_parser()``, the complete parser, which ``tests/unit/test_docs_reference.py`` reads) so
that shared flag sets (the istio-iptables flags of ``rules`` and ``apply``) are defined once, and
so that ``init`` -- which runs in every meshed pod -- imports nothing of the agent.

Exit codes shared by every subcommand: 0 success, 1 runtime failure, 2 invalid input,
3 out of scope (the pod is not one we program).

The development commands (``demo``, ``dev``) are not part of this package: the development package
beside it in the repository (``dev/``, installed by ``scripts/setup``, never in the image) adds
them through the ``istio_pod_network_controller.commands`` entry-point group. This module names
that group, never the package, so the product runs the same with or without it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    # importlib.metadata costs about half of the waiter's start-up: loaded only when a command
    # outside the product's own is looked up.
    from importlib.metadata import EntryPoint

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
EXIT_OUT_OF_SCOPE = 3

PROG = "istio-pod-network-controller"

# name -> (module under .commands, one-line help): the product's own subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "rules": ("rules", "print the redirect ruleset for istio-iptables flags or a pod manifest"),
    "run": ("run", "the node agent (DaemonSet): program this node's meshed pods"),
    "init": ("init", "the waiting init container: exit 0 once the agent has programmed this pod"),
    "webhook": ("webhook", "the admission webhook: add the waiting init container, replace istio-init"),
    "apply": ("apply", "apply and verify the redirect rules in one network namespace (root, on a node)"),
}

# Subcommands another installed distribution may add: each entry point names a module with
# ``main(argv) -> int``, ``build_parser()`` and ``SUMMARY`` (its line in the usage). A name of
# the product's own is never replaced.
ENTRY_POINT_GROUP = "istio_pod_network_controller.commands"
# Named only to say where they come from when they are missing.
DEVELOPMENT_COMMANDS = ("demo", "dev")
NOT_INSTALLED = "not installed: the development package (run ./scripts/setup from a checkout)"


class CommandUnavailable(LookupError):
    """The named subcommand is neither the product's nor installed; the message says which."""


def _extra_commands() -> dict[str, EntryPoint]:
    import importlib.metadata

    found: dict[str, EntryPoint] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in COMMANDS:
            found.setdefault(entry.name, entry)
    return found


def command_names() -> list[str]:
    """The product's subcommands, then those installed through the entry-point group."""
    return [*COMMANDS, *sorted(_extra_commands())]


def load_command(name: str) -> ModuleType:
    """The module that implements subcommand ``name``."""
    if name in COMMANDS:
        return importlib.import_module(f"{__package__}.commands.{COMMANDS[name][0]}")
    entry = _extra_commands().get(name)
    if entry is None:
        raise CommandUnavailable(
            NOT_INSTALLED if name in DEVELOPMENT_COMMANDS else f"unknown command {name!r}"
        )
    try:
        module = importlib.import_module(entry.module)
    except ImportError as e:
        # Metadata without its files (a checkout moved or deleted) is "not installed"; anything
        # else is a broken module, reported as it is.
        gone = isinstance(e, ModuleNotFoundError) and (entry.module + ".").startswith(f"{e.name}.")
        raise CommandUnavailable(NOT_INSTALLED if gone else f"{entry.value} cannot be imported: {e}") from e
    if not callable(getattr(module, "main", None)):
        raise CommandUnavailable(f"{name}: {entry.value} has no main(argv)")
    return module


def _summary(name: str) -> str:
    if name in COMMANDS:
        return COMMANDS[name][1]
    try:
        summary = getattr(load_command(name), "SUMMARY", "")
    except CommandUnavailable as e:
        return f"(unavailable: {e})"
    return summary if isinstance(summary, str) else ""


def usage() -> str:
    names = command_names()
    width = max(len(n) for n in names)
    lines = [f"usage: {PROG} COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {_summary(name)}" for name in names]
    lines += ["", f"Run '{PROG} COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK if args else EXIT_INVALID
    if args[0] == "--version":
        print(f"{PROG} {__version__}")
        return EXIT_OK
    name, rest = args[0], args[1:]
    try:
        module = load_command(name)
    except CommandUnavailable as e:
        if name in DEVELOPMENT_COMMANDS:  # a command that exists, in a package that is not here
            print(f"{PROG} {name}: {e}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"{PROG}: {e}\n\n{usage()}", file=sys.stderr)
        return EXIT_INVALID
    code: int = module.main(rest)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
