"""Find a pod's network namespace: by explicit path, by PID, or by pod UID through its cgroups.

Without a container runtime API we ask the kernel: every process of a pod sits in the kubelet's
pod cgroup, and the oldest one is the sandbox's pause process. The pod cgroup is recognised by
its name and its parent, wherever the kubelet's root is (a custom ``cgroupRoot``, kind's
``/kubelet.slice``, a cgroup namespace's ``/..``), so a path that merely names the UID does not
count. The host's own namespace is never a pod's, and a known pod IP must be present, so a stale
or foreign namespace is not programmed by mistake.

Cost: scanning every ``/proc/PID/cgroup`` grows with every process on the node. Once one pod has
been found, we know where this node's kubelet keeps pod cgroups (``CgroupRoutes``) and read the
next pod's processes from its own directory's ``cgroup.procs``; the scan stays as the fallback
(first pod, a layout we cannot see, a pod with no process yet). Every PID found either way is
checked against its own ``/proc/PID/cgroup`` before it counts.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import posixpath
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LocateError, NodeError
from .netns import IPAddress, Netns, NetnsId, netns_id_of, proc_addresses

_POD_UID = re.compile(r"^[0-9a-fA-F][0-9a-fA-F-]{7,63}$")

# The kubelet's cgroupfs layout: <root>/kubepods/pod<uid> (Guaranteed) or
# <root>/kubepods/<qos>/pod<uid>; ".." is the parent as seen from inside a cgroup namespace.
_CGROUPFS_PARENTS = frozenset({"kubepods", "besteffort", "burstable", ".."})
_QOS = ("besteffort", "burstable")
# The systemd driver spells the whole path into each name, the root's components joined by
# "-" ("kubelet-kubepods-besteffort-pod<uid_>.slice" under /kubelet.slice).
_SYSTEMD_STEM = re.compile(r"^(?:[^/]*-)?kubepods(?:-besteffort|-burstable)?$")

# Bounds on what one pod's cgroup directory may make us read; past them, the scan decides.
_MAX_POD_DIRS = 64
_MAX_POD_DEPTH = 3
_MAX_PROCS_BYTES = 256 * 1024
_MAX_ROOTS = 4


@dataclass(frozen=True, slots=True)
class Candidate:
    """A namespace that processes of the pod live in, with its oldest such process."""

    netns: NetnsId
    pid: int
    start_ticks: int


def valid_pod_uid(uid: str) -> str:
    if not _POD_UID.match(uid):
        raise LocateError("locate", f"not a pod UID: {uid!r}")
    return uid.lower()


# -- recognising the kubelet's pod cgroup ---------------------------------------------------------


def _cgroup_paths(cgroup_text: str) -> Iterator[tuple[str, str]]:
    """(controllers, path) of each ``hierarchy-id:controllers:path`` line."""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            yield parts[1], parts[2]


def pod_segment(segments: list[str], uid: str) -> int | None:
    """Index of pod ``uid``'s cgroup among a path's segments, or None.

    cgroupfs: ``pod<uid>`` (dashes, or underscores as some runtimes write it) whose parent is
    ``kubepods`` or a QoS level. systemd: ``<stem>-pod<uid_>.slice`` where the stem is
    ``[<root>-]kubepods[-<qos>]`` and the parent is ``<stem>.slice``. A cgroup namespace may hide
    the parent behind ``..``; that parent is accepted too."""
    uid = uid.lower()
    cgroupfs = {f"pod{uid}", f"pod{uid.replace('-', '_')}"}
    systemd_tail = f"-pod{uid.replace('-', '_')}.slice"
    for i in range(1, len(segments)):
        name, parent = segments[i], segments[i - 1]
        if name in cgroupfs:
            if parent in _CGROUPFS_PARENTS:
                return i
        elif name.endswith(systemd_tail):
            stem = name[: -len(systemd_tail)]
            if _SYSTEMD_STEM.match(stem) and parent in (f"{stem}.slice", ".."):
                return i
    return None


def in_pod_cgroup(cgroup_text: str, uid: str) -> bool:
    """True when a ``/proc/PID/cgroup`` text puts the process in pod ``uid``'s cgroup, under
    either cgroup driver, in any hierarchy, under any kubelet cgroupRoot."""
    uid = uid.lower()
    if uid not in cgroup_text and uid.replace("-", "_") not in cgroup_text:
        return False  # most processes: decided without splitting anything
    return any(pod_segment(path.split("/"), uid) is not None for _, path in _cgroup_paths(cgroup_text))


# -- where this node's kubelet keeps pod cgroups ------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """A cgroup hierarchy mounted where we can read it."""

    path: str  # mount point, as we see it
    root: str  # the hierarchy's directory at that mount point ("/" when the whole hierarchy)
    controllers: frozenset[str] | None  # v1 controllers ("name=systemd" included); None for v2


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_cgroup_mounts(mountinfo: str) -> list[CgroupMount]:
    """The cgroup (v1) and cgroup2 mounts of a ``/proc/PID/mountinfo`` text."""
    found: list[CgroupMount] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            controllers = None
        elif tail[0] == "cgroup":
            controllers = frozenset(tail[2].split(","))
        else:
            continue
        found.append(CgroupMount(_unescape(fields[4]), _unescape(fields[3]), controllers))
    return found


@dataclass(frozen=True, slots=True)
class KubeletRoot:
    """The kubelet's ``kubepods`` directory in one hierarchy, as we can read it, and its naming."""

    dir: str
    systemd_stem: str | None  # "kubepods", "kubelet-kubepods"...; None for the cgroupfs driver

    def pod_dirs(self, uid: str) -> tuple[str, ...]:
        """Where pod ``uid``'s cgroup is, for each QoS class."""
        if self.systemd_stem is None:
            names = dict.fromkeys((f"pod{uid}", f"pod{uid.replace('-', '_')}"))
            return tuple(f"{self.dir}/{p}{n}" for p in ("", *(f"{q}/" for q in _QOS)) for n in names)
        stem, under = self.systemd_stem, uid.replace("-", "_")
        return (
            f"{self.dir}/{stem}-pod{under}.slice",
            *(f"{self.dir}/{stem}-{q}.slice/{stem}-{q}-pod{under}.slice" for q in _QOS),
        )


def kubelet_root_of(path: str, uid: str) -> tuple[str, str | None] | None:
    """The kubepods directory (a path in the hierarchy) and systemd stem (None: cgroupfs) that
    pod ``uid``'s cgroup ``path`` sits under; None when it cannot be told (not the pod's, or
    seen through ``..``)."""
    segments = path.split("/")
    i = pod_segment(segments, uid)
    if i is None or ".." in segments[:i]:
        return None
    ancestors, name = segments[:i], segments[i]
    if not name.endswith(".slice"):  # cgroupfs: pod<uid>
        if ancestors[-1] in _QOS:
            ancestors = ancestors[:-1]
        return "/".join(ancestors) or "/", None
    stem = name[: name.rindex("-pod")]
    for q in _QOS:
        if stem.endswith(f"-{q}"):
            stem, ancestors = stem[: -len(q) - 1], ancestors[:-1]
    return "/".join(ancestors) or "/", stem


def _readable_dir(mount: CgroupMount, hierarchy_path: str) -> str | None:
    """Where a directory of the mount's hierarchy is under its mount point, if it is."""
    root = mount.root.rstrip("/")
    if hierarchy_path != root and not hierarchy_path.startswith(root + "/"):
        return None
    return posixpath.normpath(mount.path + hierarchy_path[len(root) :])


def _mounts_of(mounts: list[CgroupMount], controllers: str) -> Iterator[CgroupMount]:
    """The mounts of the hierarchy a ``/proc/PID/cgroup`` line names ("" is cgroup2)."""
    wanted = frozenset(c for c in controllers.split(",") if c)
    for mount in mounts:
        if mount.controllers is None:
            if not wanted:
                yield mount
        elif wanted and wanted <= mount.controllers:
            yield mount


def _read_procs(path: str) -> list[int] | None:
    """The PIDs of one ``cgroup.procs``; None when it is longer than we read."""
    with open(path, "rb") as f:
        data = f.read(_MAX_PROCS_BYTES + 1)
    if len(data) > _MAX_PROCS_BYTES:
        return None
    return [int(x) for x in data.split() if x.isdigit()]


def pids_under(directory: str) -> list[int] | None:
    """PIDs in ``directory``'s ``cgroup.procs`` and its sub-cgroups', breadth first (the
    containers before anything they nest); [] when it does not exist. None when the bounds (depth,
    directories, bytes) left part of it unread: then only a scan sees every process."""
    pids: list[int] = []
    queue, seen = collections.deque([(directory, 0)]), 0
    while queue:
        if seen == _MAX_POD_DIRS:
            return None
        current, depth = queue.popleft()
        seen += 1
        try:
            listed = _read_procs(f"{current}/cgroup.procs")
            with os.scandir(current) as entries:
                children = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue  # gone meanwhile, or not there at all
        if listed is None or (children and depth == _MAX_POD_DEPTH):
            return None
        pids.extend(listed)
        queue.extend((child, depth + 1) for child in children)
    return pids


class CgroupRoutes:
    """Where this node's kubelet keeps pod cgroups, learned from pods already found.

    A pod found (by the scan) tells us its kubepods directory and naming; with a cgroup mount
    of that hierarchy in our own mount table (root "/" or an ancestor), the next pod's
    processes are read from its directory. Thread-safe: the agent locates from worker threads.
    """

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self._mountinfo = mountinfo
        self._roots: tuple[KubeletRoot, ...] = ()
        self._lock = threading.Lock()

    @property
    def roots(self) -> tuple[KubeletRoot, ...]:
        return self._roots

    def pids(self, uid: str) -> list[int] | None:
        """PIDs in pod ``uid``'s cgroup under every learned root (unverified: the caller
        checks each against its own /proc/PID/cgroup); None when one was too big to read whole."""
        found: list[int] = []
        for root in self._roots:
            if not os.path.isdir(root.dir):
                self._forget(root)  # the kubelet's root went away (or was never its)
                continue
            for directory in root.pod_dirs(uid):
                pids = pids_under(directory)
                if pids is None:
                    return None
                found.extend(pids)
        return found

    def _forget(self, root: KubeletRoot) -> None:
        with self._lock:
            self._roots = tuple(r for r in self._roots if r != root)

    def learn(self, cgroup_text: str, uid: str) -> KubeletRoot | None:
        """Remember the kubepods directory of a process of pod ``uid``; what was learned."""
        try:
            mounts = parse_cgroup_mounts(Path(self._mountinfo).read_text())
        except OSError:
            return None
        for controllers, path in _cgroup_paths(cgroup_text):
            found = kubelet_root_of(path, uid)
            if found is None:
                continue
            hierarchy_dir, stem = found
            for mount in _mounts_of(mounts, controllers):
                readable = _readable_dir(mount, hierarchy_dir)
                if readable is None or not os.path.isdir(readable):
                    continue
                root = KubeletRoot(readable, stem)
                with self._lock:
                    if root not in self._roots and len(self._roots) < _MAX_ROOTS:
                        self._roots = (*self._roots, root)
                return root
        return None


_ROUTES: dict[str, CgroupRoutes] = {}
_ROUTES_LOCK = threading.Lock()


def routes_for(proc_root: str) -> CgroupRoutes:
    """The process-wide routes used with ``proc_root`` (PIDs only mean something there)."""
    with _ROUTES_LOCK:
        return _ROUTES.setdefault(proc_root, CgroupRoutes())


# -- candidates ------------------------------------------------------------------------------------


def _start_ticks(stat_text: str) -> int:
    # Field 22 of /proc/PID/stat, counted after the parenthesised command name.
    fields = stat_text[stat_text.rindex(")") + 2 :].split()
    return int(fields[19])


def host_netns_ids(proc_root: str) -> set[NetnsId]:
    """The host's network namespace (PID 1 under ``proc_root``) and the agent's own."""
    found: set[NetnsId] = set()
    for path in (f"{proc_root}/1/ns/net", "/proc/self/ns/net"):
        try:
            found.add(netns_id_of(path))
        except OSError:
            continue
    return found


@dataclass
class _Gathered:
    best: dict[NetnsId, Candidate]
    in_host: int = 0
    matched: int = 0

    def sorted(self) -> list[Candidate]:
        return sorted(self.best.values(), key=lambda c: (c.start_ticks, c.pid))


def _gather(uid: str, pids: Iterable[int], proc_root: str, hosts: set[NetnsId]) -> _Gathered:
    """Keep, per namespace, the oldest of ``pids`` whose own cgroup file names pod ``uid``."""
    out = _Gathered({})
    for pid in pids:
        base = f"{proc_root}/{pid}"
        try:
            with open(f"{base}/cgroup") as f:
                if not in_pod_cgroup(f.read(), uid):
                    continue
            ns = netns_id_of(f"{base}/ns/net")
            with open(f"{base}/stat") as f:
                ticks = _start_ticks(f.read())
        except (OSError, ValueError, IndexError):
            continue  # the process exited meanwhile, or is not ours to read
        out.matched += 1
        if ns in hosts:
            out.in_host += 1
            continue
        known = out.best.get(ns)
        if known is None or (ticks, pid) < (known.start_ticks, known.pid):
            out.best[ns] = Candidate(ns, pid, ticks)
    return out


def _all_pids(proc_root: str) -> Iterator[int]:
    with os.scandir(proc_root) as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def pod_candidates(
    uid: str, proc_root: str = "/proc", *, routes: CgroupRoutes | None = None
) -> tuple[list[Candidate], int]:
    """Namespaces holding processes of pod ``uid``, oldest first, without the host's; and how
    many of the pod's processes were in the host's namespace. From the pod's own cgroup when
    ``routes`` knows where it is, else from a scan of every process under ``proc_root``."""
    found, _ = _find(valid_pod_uid(uid), proc_root, routes)
    return found.sorted(), found.in_host


def _find(uid: str, proc_root: str, routes: CgroupRoutes | None) -> tuple[_Gathered, bool]:
    """The pod's processes, and whether they came from a full scan."""
    hosts = host_netns_ids(proc_root)
    listed = routes.pids(uid) if routes is not None else None
    if listed:
        via_cgroup = _gather(uid, set(listed), proc_root, hosts)
        if via_cgroup.matched:
            return via_cgroup, False
    return _gather(uid, _all_pids(proc_root), proc_root, hosts), True


def parse_ips(values: Iterable[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for value in values:
        try:
            out.append(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise LocateError("locate", f"not an IP address: {value!r}") from None
    return out


def _learn_from(routes: CgroupRoutes, proc_root: str, pid: int, uid: str, ns: Netns) -> None:
    """Teach ``routes`` where the kubelet keeps the pod cgroup of the accepted process."""
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            text = f.read()
        if ns.id != netns_id_of(f"{proc_root}/{pid}/ns/net"):
            return  # PID reused
    except OSError:
        return
    routes.learn(text, uid)


def by_pod_uid(
    uid: str,
    *,
    pod_ips: Iterable[str] = (),
    proc_root: str = "/proc",
    routes: CgroupRoutes | None = None,
    scan_only: bool = False,
) -> Netns:
    """Open pod ``uid``'s network namespace, found through its cgroups (``routes``, by default
    the process-wide one for ``proc_root``) or ``proc_root``'s cgroup files."""
    ips = parse_ips(pod_ips)
    if scan_only:
        routes = None
    elif routes is None:
        routes = routes_for(proc_root)
    uid = valid_pod_uid(uid)
    found, scanned = _find(uid, proc_root, routes)
    candidates, in_host = found.sorted(), found.in_host
    if not candidates:
        if in_host:
            raise LocateError(
                "locate",
                f"pod {uid} runs in the host network namespace (hostNetwork?): refusing to program it",
            )
        raise LocateError("locate", f"no process of pod {uid} under {proc_root} (not started, or gone)")
    for cand in candidates:
        ns = _open_checked(cand, ips, proc_root)
        if ns is not None:
            if routes is not None and scanned:
                _learn_from(routes, proc_root, cand.pid, uid, ns)
            return ns
    shown = ", ".join(str(ip) for ip in ips)
    raise LocateError(
        "locate", f"none of the {len(candidates)} network namespaces of pod {uid} holds {shown}"
    )


def _open_checked(cand: Candidate, ips: list[IPAddress], proc_root: str) -> Netns | None:
    """The candidate's namespace, opened, if it is still the one found and holds a pod IP."""
    try:
        ns = Netns(f"{proc_root}/{cand.pid}/ns/net")
    except LocateError:
        return None  # exited since the scan
    if ns.id != cand.netns:
        ns.close()
        return None  # PID reused
    if not ips:
        return ns
    try:
        # /proc/PID/net shows PID's network namespace: read it there, or ask `ip` as a fallback.
        present = proc_addresses(proc_root, cand.pid)
        if ns.id != netns_id_of(f"{proc_root}/{cand.pid}/ns/net"):
            raise OSError("PID reused")
    except OSError:
        try:
            present = ns.addresses()
        except NodeError:
            ns.close()
            return None
    if any(ip in present for ip in ips):
        return ns
    ns.close()
    return None


def by_pid(pid: int, *, proc_root: str = "/proc") -> Netns:
    if pid <= 0:
        raise LocateError("locate", f"not a PID: {pid}")
    return by_path(f"{proc_root}/{pid}/ns/net", proc_root=proc_root)


def by_path(path: str, *, proc_root: str = "/proc") -> Netns:
    """Open an explicit namespace path (``/var/run/netns/NAME``, ``/proc/PID/ns/net``)."""
    ns = Netns(path)
    if ns.id in host_netns_ids(proc_root):
        ns.close()
        raise LocateError("locate", f"{path} is the host's network namespace: refusing to program it")
    return ns
