"""Command line entry point: dispatch to one module per subcommand.

Each subcommand owns its argument parser (``commands/<name>.py``, functions ``main(argv)`` and
``build_parser()``, the complete parser, which ``tests/unit/test_docs_reference.py`` reads) so
that shared flag sets (the istio-iptables flags of ``rules`` and ``apply``) are defined once, and
so that ``init`` -- which runs in every meshed pod -- imports nothing of the agent.

Exit codes shared by every subcommand: 0 success, 1 runtime failure, 2 invalid input,
3 out of scope (the pod is not one we program).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from . import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
EXIT_OUT_OF_SCOPE = 3

PROG = "istio-pod-network-controller"

# name -> (module under .commands, one-line help). Added to as subcommands land.
COMMANDS: dict[str, tuple[str, str]] = {
    "rules": ("rules", "print the redirect ruleset for istio-iptables flags or a pod manifest"),
    "run": ("run", "the node agent (DaemonSet): program this node's meshed pods"),
    "init": ("init", "the waiting init container: exit 0 once the agent has programmed this pod"),
    "webhook": ("webhook", "the admission webhook: add the waiting init container, replace istio-init"),
    "apply": ("apply", "apply and verify the redirect rules in one network namespace (root, on a node)"),
    "demo": ("demo", "the whole system on this machine (root): sample app, live progress, summary"),
    "dev": ("dev", "developer tools: 'dev cluster' runs a local etcd + kube-apiserver until Ctrl-C"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"usage: {PROG} COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
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
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_INVALID
    module = importlib.import_module(f".commands.{COMMANDS[name][0]}", __package__)
    code: int = module.main(rest)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
