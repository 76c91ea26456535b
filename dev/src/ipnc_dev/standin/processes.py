"""Processes and cgroups of a stand-in's containers: signalling our own children only, reading
the tail of a log, and running the node's tools (``ip``, ``nsenter``) with a time limit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

LOG_TAIL_BYTES = 2048  # the kubelet's limit for a termination message taken from the log
LOG_TAIL_LINES = 80


def tail(path: Path, *, lines: int = LOG_TAIL_LINES, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
    return text[-limit:]


def killpg(pid: int, sig: signal.Signals) -> None:
    """Signal the process group our child ``pid`` leads (a container's processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def our_group_leader(pid: int) -> bool:
    """Whether ``pid`` is still our child and leads its process group (not a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
    return len(fields) > 2 and fields[1] == str(os.getpid()) and fields[2] == str(pid)


def kill_cgroup(directory: Path) -> None:
    """SIGKILL the processes left in one of our container cgroups (by their PIDs)."""
    with contextlib.suppress(OSError):
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def run_tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
