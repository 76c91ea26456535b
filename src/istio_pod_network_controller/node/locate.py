"""Find a pod's network namespace: by explicit path, by PID, or by pod UID through /proc.

Without a container runtime API we ask the kernel: every process of a pod sits in the kubelet's
pod cgroup (``.../kubepods/<qos>/pod<uid>/...`` with the cgroupfs driver,
``.../kubepods-<qos>-pod<uid_with_underscores>.slice/...`` with systemd; v1 and v2 alike), and
the oldest one is the sandbox's pause process. The host's own namespace is never a pod's, and a
known pod IP must be present, so a stale or foreign namespace is not programmed by mistake.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import LocateError, NodeError
from .netns import IPAddress, Netns, NetnsId, netns_id_of, proc_addresses

_POD_UID = re.compile(r"^[0-9a-fA-F][0-9a-fA-F-]{7,63}$")


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


def in_pod_cgroup(cgroup_text: str, uid: str) -> bool:
    """True when a ``/proc/PID/cgroup`` text puts the process in pod ``uid``'s cgroup, under
    either cgroup driver, in any hierarchy."""
    uid = uid.lower()
    cgroupfs = f"pod{uid}"
    systemd = f"-pod{uid.replace('-', '_')}.slice"
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        under_kubepods = False
        for segment in path.split("/"):
            if segment.startswith("kubepods"):
                under_kubepods = True
                if segment.endswith(systemd):
                    return True
            elif under_kubepods and segment == cgroupfs:
                return True
    return False


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


def pod_candidates(uid: str, proc_root: str = "/proc") -> tuple[list[Candidate], int]:
    """Namespaces holding processes of pod ``uid``, oldest first, without the host's; and how
    many of the pod's processes were in the host's namespace."""
    uid = valid_pod_uid(uid)
    hosts = host_netns_ids(proc_root)
    best: dict[NetnsId, Candidate] = {}
    in_host = 0
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        base = Path(proc_root, entry.name)
        try:
            if not in_pod_cgroup((base / "cgroup").read_text(), uid):
                continue
            ns = netns_id_of(base / "ns" / "net")
            ticks = _start_ticks((base / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # the process exited meanwhile, or is not ours to read
        if ns in hosts:
            in_host += 1
            continue
        pid = int(entry.name)
        known = best.get(ns)
        if known is None or (ticks, pid) < (known.start_ticks, known.pid):
            best[ns] = Candidate(ns, pid, ticks)
    return sorted(best.values(), key=lambda c: (c.start_ticks, c.pid)), in_host


def parse_ips(values: Iterable[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for value in values:
        try:
            out.append(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise LocateError("locate", f"not an IP address: {value!r}") from None
    return out


def by_pod_uid(uid: str, *, pod_ips: Iterable[str] = (), proc_root: str = "/proc") -> Netns:
    """Open pod ``uid``'s network namespace, found through ``proc_root``'s cgroup files."""
    ips = parse_ips(pod_ips)
    candidates, in_host = pod_candidates(uid, proc_root)
    if not candidates:
        if in_host:
            raise LocateError(
                "locate",
                f"pod {uid} runs in the host network namespace (hostNetwork?): refusing to program it",
            )
        raise LocateError("locate", f"no process of pod {uid} under {proc_root} (not started, or gone)")
    for cand in candidates:
        try:
            ns = Netns(f"{proc_root}/{cand.pid}/ns/net")
        except LocateError:
            continue  # exited since the scan
        if ns.id != cand.netns:
            ns.close()
            continue  # PID reused
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
                continue
        if any(ip in present for ip in ips):
            return ns
        ns.close()
    shown = ", ".join(str(ip) for ip in ips)
    raise LocateError(
        "locate", f"none of the {len(candidates)} network namespaces of pod {uid} holds {shown}"
    )


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
