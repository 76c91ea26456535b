"""Run the project's CLI as a container's unprivileged user, from an interpreter that user cannot read.

The node stand-in runs a container using the project's image as that image would: the CLI with
the container's arguments, as the container's UID. On the machines the tests run on, the
interpreter and its standard library live under ``/root`` (mode 0700), so a plain ``exec`` as UID
65532 fails. This launcher starts as root (already inside the pod's network namespace), loads
the CLI and the subcommand's modules, then drops to the container's UID and GID with no
supplementary groups and no capabilities, and runs the subcommand in the same interpreter: the
code under test runs unprivileged, exactly as in the image.

    python -m ipnc_dev.launch --user UID:GID -- ARGS...

The parent-death signal is set again after the drop (changing credentials clears it), so the
container dies with the stand-in's thread that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from istio_pod_network_controller import cli

# Modules a subcommand imports only when it runs (they must be loaded while still root).
LATE_IMPORTS: dict[str, tuple[str, ...]] = {"init": ("inotify_simple",)}
_PR_SET_PDEATHSIG = 1


def _usage() -> int:
    print("usage: launch --user UID:GID -- ARGS...", file=sys.stderr)
    return cli.EXIT_INVALID


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or not args[0].startswith("--user=") or args[1] != "--":
        return _usage()
    uid_text, _, gid_text = args[0].removeprefix("--user=").partition(":")
    try:
        uid, gid = int(uid_text), int(gid_text or uid_text)
    except ValueError:
        return _usage()
    rest = args[2:]
    if rest and rest[0] in cli.COMMANDS:
        cli.load_command(rest[0])
        for module in LATE_IMPORTS.get(rest[0], ()):
            # the subcommand copes without it, as it would in an image lacking it
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    sys.argv = [cli.PROG, *rest]
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
