"""Kubelet-style pod cgroups for tests, without a kubelet: real cgroup directories, real moves.

The namespace locator finds a pod's processes through ``/proc/PID/cgroup``; to test it for real
we put processes into cgroups laid out as the kubelet lays them out, with the systemd driver
(``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope``)
or the cgroupfs one (``kubepods/<qos>/pod<uid>/<id>``), on the cgroup v2 tree or the v1 ``pids``
tree. No controller is enabled and no limit set; everything sits under a random top directory
that ``close()`` removes (processes still inside go back to the root cgroup first).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


class Driver(enum.Enum):
    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"


def mounts() -> dict[str, Path]:
    """Mount points from /proc/self/mountinfo: ``"v2"`` for cgroup2, ``"pids"`` for the v1 pids tree."""
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue
        if tail[0] == "cgroup2":
            found.setdefault("v2", Path(fields[4]))
        elif tail[0] == "cgroup" and "pids" in tail[2].split(","):
            found.setdefault("pids", Path(fields[4]))
    return found


def pod_cgroup_path(uid: str, container: str, *, driver: Driver, qos: str = "besteffort") -> str:
    """The relative path the kubelet would give a container of pod ``uid``."""
    if driver is Driver.SYSTEMD:
        under = uid.replace("-", "_")
        if qos == "guaranteed":
            return f"kubepods.slice/kubepods-pod{under}.slice/cri-containerd-{container}.scope"
        pod = f"kubepods-{qos}-pod{under}.slice"
        return f"kubepods.slice/kubepods-{qos}.slice/{pod}/cri-containerd-{container}.scope"
    if qos == "guaranteed":
        return f"kubepods/pod{uid}/{container}"
    return f"kubepods/{qos}/pod{uid}/{container}"


@dataclass
class KubeletCgroups:
    """Creates pod cgroups under ``<mount>/<top>/`` and removes them at close."""

    top: str = field(default_factory=lambda: "ipnc-test-" + secrets.token_hex(3))
    _created: list[Path] = field(default_factory=list)

    def __enter__(self) -> KubeletCgroups:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def place(
        self,
        pid: int,
        *,
        uid: str,
        container: str,
        driver: Driver = Driver.SYSTEMD,
        tree: str = "v2",
        qos: str = "besteffort",
        path: str | None = None,
    ) -> Path:
        """Move ``pid`` into pod ``uid``'s container cgroup on ``tree`` ("v2" or "pids"); or into
        ``path`` (relative, under our top directory) when given."""
        mount = mounts().get(tree)
        if mount is None:
            raise RuntimeError(f"no {tree} cgroup tree mounted here")
        relative = path or pod_cgroup_path(uid, container, driver=driver, qos=qos)
        target = mount
        for part in [self.top, *relative.split("/")]:
            target = target / part
            if not target.exists():
                target.mkdir()
                self._created.append(target)
        (target / "cgroup.procs").write_text(f"{pid}\n")
        return target

    def close(self) -> None:
        for directory in sorted(self._created, key=lambda p: len(p.parts), reverse=True):
            root = _mount_root(directory)
            with contextlib.suppress(OSError):
                for pid in (directory / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (root / "cgroup.procs").write_text(f"{pid}\n")
            _rmdir(directory)
        self._created = [d for d in self._created if d.exists()]


def _rmdir(directory: Path) -> None:
    """Remove a cgroup directory; a task that just left may keep it busy for a moment."""
    deadline = time.monotonic() + 2
    while directory.exists():
        try:
            directory.rmdir()
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return
            time.sleep(0.01)


def _mount_root(directory: Path) -> Path:
    for mount in mounts().values():
        if directory.is_relative_to(mount):
            return mount
    raise RuntimeError(f"{directory} is not under a cgroup mount")
