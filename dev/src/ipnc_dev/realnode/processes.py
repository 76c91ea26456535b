"""The harness's child processes, the namespaces it makes, and the cgroups it creates.

Everything a real node runs is started here, as a child of this process, and stopped by its PID:
never by name, never a process the harness did not start (or that its containerd did not start,
found in the namespaces and cgroups the harness created). Children get ``PR_SET_PDEATHSIG``, so
they die with the harness even if it is killed outright; a cgroup is only ever created (and only
if it did not exist) and removed again, never written to beyond a new cpuset's CPUs and memory
nodes, and no process is ever moved into or out of one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
STOP_SECONDS = 10.0
KILL_WAIT_SECONDS = 5.0
CGROUP_MOUNTS = Path("/sys/fs/cgroup")


def _die_with_parent() -> None:  # in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Proc:
    """One child process, its output appended to ``log_path``, in a session of its own (a
    Ctrl-C at the terminal reaches the harness only, which stops children in order)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        # Kept so that the same program can be started again (a restart scenario).
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._log: IO[bytes] = log_path.open("ab")
        try:
            self.popen = subprocess.Popen(  # noqa: S603 - argument lists of binaries we built or chose
                self.argv,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    def tail(self, lines: int = 30) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def close_log(self) -> None:
        self._log.close()


def stop_all(procs: Iterable[Proc], timeout: float = STOP_SECONDS) -> list[str]:
    """SIGTERM to every running one at once, SIGKILL to those still there after ``timeout``;
    returns the names of those that had to be killed."""
    running = [p for p in procs if p.exited() is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.popen.send_signal(signal.SIGTERM)
    killed: list[str] = []
    deadline = time.monotonic() + timeout
    for p in running:
        try:
            p.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            killed.append(p.name)
            try:
                p.popen.wait(KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                killed.append(f"{p.name} (still there after SIGKILL)")
    for p in running:
        p.close_log()
    return killed


def wait_until(predicate: Callable[[], bool], timeout: float, *, interval: float = 0.1) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass; returns its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# -- namespaces ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NsId:
    """A namespace, as ``stat`` of ``/proc/PID/ns/<kind>`` identifies it."""

    kind: str  # "net" or "mnt"
    dev: int
    inode: int


def ns_of(pid: int, kind: str) -> NsId:
    st = os.stat(f"/proc/{pid}/ns/{kind}")
    return NsId(kind, st.st_dev, st.st_ino)


def pids_in_namespaces(namespaces: Iterable[NsId], *, exclude: Iterable[int] = ()) -> list[int]:
    """Live processes in any of ``namespaces`` (but ``exclude``)."""
    wanted = set(namespaces)
    kinds = {n.kind for n in wanted}
    skip = set(exclude) | {os.getpid()}
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        for kind in kinds:
            try:
                if ns_of(int(entry.name), kind) in wanted:
                    found.append(int(entry.name))
                    break
            except OSError:
                break  # gone, or a kernel thread
    return sorted(found)


def kill_pids(pids: Iterable[int], timeout: float = KILL_WAIT_SECONDS) -> list[int]:
    """SIGKILL each and wait until it is gone; returns those still there after ``timeout``."""
    pending = set(pids)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for pid in pending:
            _reap(pid)
        pending = {p for p in pending if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
        if pending:
            time.sleep(0.05)
    return sorted(pending)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is a child of ours (else it is its parent's to reap)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith("Z")


# -- cgroups ---------------------------------------------------------------------------------------


def cgroup_hierarchies(mountinfo: str | None = None) -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 and v2) mounted at its root under
    /sys/fs/cgroup, from /proc/self/mountinfo."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    found: list[Path] = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or not tail or tail[0] not in ("cgroup", "cgroup2") or fields[3] != "/":
            continue
        mount = Path(fields[4])
        if mount.parent == CGROUP_MOUNTS and mount not in found:
            found.append(mount)
    return found


class CgroupExistsError(FileExistsError):
    """A cgroup of the name the harness wanted already exists: it is not ours to use."""


def create_cgroup(name: str, hierarchies: Sequence[Path], created: list[Path]) -> None:
    """``<hierarchy>/<name>`` in every hierarchy (a node's cgroupRoot, which the kubelet wants to
    exist everywhere), each appended to ``created`` as soon as it exists (so that the caller
    removes exactly those, also when a later one fails); a new v1 cpuset starts with no CPU and no
    memory node, so it gets its parent's."""
    for h in hierarchies:
        path = h / name
        try:
            path.mkdir()
        except FileExistsError:
            raise CgroupExistsError(f"cgroup {path} already exists: not ours, not touched") from None
        created.append(path)
        if (h / "cpuset.cpus").is_file():
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (path / knob).write_text((h / knob).read_text())


def cgroup_dirs(tops: Iterable[Path]) -> list[Path]:
    """Every directory of each of ``tops`` and below, deepest first."""
    out: list[Path] = []
    for top in tops:
        if not top.is_dir():
            continue
        for dirpath, _, _ in os.walk(top, topdown=False):
            out.append(Path(dirpath))
    return out


def pids_in_cgroups(tops: Iterable[Path]) -> list[int]:
    """Processes in any of ``tops`` or below."""
    found: set[int] = set()
    for d in cgroup_dirs(tops):
        try:
            found |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
        except (OSError, ValueError):
            continue
    found.discard(os.getpid())
    return sorted(found)


def remove_cgroups(tops: Sequence[Path], timeout: float = 10.0) -> list[str]:
    """rmdir each of ``tops`` and everything below, deepest first, retrying while the kernel
    still counts a process that just exited; returns what could not be removed."""
    deadline = time.monotonic() + timeout
    while True:
        left: list[str] = []
        for d in cgroup_dirs(tops):
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise
                left.append(str(d))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
