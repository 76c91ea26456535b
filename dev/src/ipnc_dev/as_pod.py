"""Run a subcommand the way a restricted pod's container runs it: in the pod's network namespace,
as a non-root UID, with no capabilities and no way to regain privileges.

The kernel tests and the node stand-in start the real waiter with it, so that what passes there is
what runs under Pod Security `restricted`. Started as root, it imports the subcommand first (the
interpreter and the project may sit where that UID cannot read, such as a root-only home), joins
the network namespace, sets no_new_privs, drops to the UID and GID, then runs the subcommand in
this same process.

    python -m ipnc_dev.as_pod --netns PATH --user 65532 -- init --file F
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import sys
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
PRELOAD = {"init": ("inotify_simple", "istio_pod_network_controller.spec.pod")}


def command(netns: str | None, user: int, *argv: str) -> list[str]:
    """The argument list that runs ``argv`` (a subcommand and its flags) as a pod would."""
    head = [sys.executable, "-m", "ipnc_dev.as_pod", f"--user={user}"]
    return [*head, *([f"--netns={netns}"] if netns else []), "--", *argv]


def _enter(netns: str, libc: ctypes.CDLL) -> None:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="as_pod")
    parser.add_argument("--netns", help="network namespace to join (a path)")
    parser.add_argument("--user", type=int, required=True, help="UID and GID to run as (not 0)")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if not rest or args.user <= 0:
        parser.error("give a non-root --user and a subcommand after --")
    from istio_pod_network_controller import cli

    module = cli.load_command(rest[0])
    for name in PRELOAD.get(rest[0], ()):
        importlib.import_module(name)
    libc = ctypes.CDLL(None, use_errno=True)
    if args.netns:
        _enter(args.netns, libc)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.setgroups([])
    os.setgid(args.user)
    os.setuid(args.user)  # root -> non-root: the permitted and effective capabilities are cleared
    code: int = module.main(rest[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
