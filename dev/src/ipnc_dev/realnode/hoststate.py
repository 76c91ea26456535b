"""What the host looks like, in the respects a real node could change it, and the difference
between two such pictures.

A real node runs programs that change hosts as a matter of course (the kubelet writes global
sysctls, kube-proxy and CNI write iptables, containerd mounts, runc creates cgroups); the harness
keeps all of it inside namespaces and cgroups of its own. ``capture()`` records the host side --
the sysctls any of them writes, the host network namespace's rulesets, links and routes,
``/proc/self/mounts``, the top-level cgroups of every hierarchy, ``ip netns`` names and the
processes descended from this one -- before a cluster starts and after it is gone, and
``diff()`` names each difference, so a test can say "nothing differs from before".

On a development machine other work runs at the same time: the other test tiers' own throw-away
namespaces and cgroups (random ``ipnc...`` names) and other real clusters' (``ipnc-rn-<run>``)
are *foreign* and left out; anything else, including any leftover named after this run, counts.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Global sysctls the kubelet wants (see config.KUBELET_SYSCTLS), and those of the host network
# namespace that kube-proxy, the bridge plugin or the kubelet set in a namespace they run in.
WATCHED_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/all/accept_redirects",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/nf_conntrack_max",
    "fs/inotify/max_user_instances",
    "fs/inotify/max_user_watches",
    "kernel/pid_max",
    "vm/max_map_count",
)
RULESET_COMMANDS: Mapping[str, tuple[str, ...]] = {
    "iptables-save": ("iptables-save",),
    "ip6tables-save": ("ip6tables-save",),
    "iptables-legacy-save": ("iptables-legacy-save",),
    "ip6tables-legacy-save": ("ip6tables-legacy-save",),
    "nft": ("nft", "list", "ruleset"),
}
LINK_COMMANDS: Mapping[str, tuple[str, ...]] = {
    "links": ("ip", "-o", "link", "show"),
    "addresses": ("ip", "-o", "address", "show"),
    "routes": ("ip", "route", "show", "table", "all"),
    "routes6": ("ip", "-6", "route", "show", "table", "all"),
}
COMMAND_TIMEOUT = 30.0
# Names the other test tiers give their throw-away namespaces and cgroups (ipnc_dev.netlab,
# ipnc_dev.cgroups, the node stand-in, tests/kernel/nft_state.py): ipnc<hex6>..., ipnc-test-<hex6>,
# ipnc-node-<hex6>, ipnc-nft-<pid>-<hex>.
# What other test tiers and the benchmarks create meanwhile (not this cluster's).
OTHER_TIERS = re.compile(
    r"ipnc(?:-test-|-node-)?[0-9a-f]{6}(?![0-9a-f])|ipnc-nft-[0-9]+-[0-9a-f]+"
    r"|ipnc-bench-[0-9a-f]{8}(?![0-9a-f])|ipncbench[0-9a-f]{4}-"
)
REAL_CLUSTER = re.compile(r"ipnc-rn-([0-9a-f]{6})(?![0-9a-f])")
# Counters and per-boot values that change by themselves.
_COUNTERS = re.compile(r"\[\d+:\d+\]")
_LINK_STATS = re.compile(r"\b(?:qlen|link-netnsid) \d+")


@dataclass(frozen=True)
class HostState:
    """One picture of the host (see the module's docstring). Every field is comparable text."""

    sysctls: Mapping[str, str] = field(default_factory=dict)
    rulesets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    network: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mounts: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()
    netns: tuple[str, ...] = ()
    processes: tuple[str, ...] = ()

    def diff(self, after: HostState, *, foreign: Callable[[str], bool] = lambda _: False) -> list[str]:
        """Each difference from ``self`` (before) to ``after``, one line each, without those
        ``foreign`` says belong to someone else."""
        out: list[str] = []
        for key in sorted(set(self.sysctls) | set(after.sysctls)):
            was, now = self.sysctls.get(key, "(absent)"), after.sysctls.get(key, "(absent)")
            if was != now:
                out.append(f"sysctl {key.replace('/', '.')}: {was} -> {now}")
        for name in sorted(set(self.rulesets) | set(after.rulesets)):
            out += _multiset_diff(f"{name} rule", self.rulesets.get(name, ()), after.rulesets.get(name, ()))
        for name in sorted(set(self.network) | set(after.network)):
            out += _multiset_diff(name[:-1] if name.endswith("s") else name,
                                  self.network.get(name, ()), after.network.get(name, ()))  # fmt: skip
        out += _multiset_diff("mount", self.mounts, after.mounts)
        out += _multiset_diff("cgroup", self.cgroups, after.cgroups)
        out += _multiset_diff("netns", self.netns, after.netns)
        out += _multiset_diff("process", self.processes, after.processes)
        return [line for line in out if not foreign(line)]


def _multiset_diff(what: str, before: Iterable[str], after: Iterable[str]) -> list[str]:
    was, now = Counter(before), Counter(after)
    lines = [f"{what} gone: {item}" for item in sorted((was - now).elements())]
    lines += [f"{what} added: {item}" for item in sorted((now - was).elements())]
    return lines


def foreign_to(run_id: str) -> Callable[[str], bool]:
    """A ``foreign`` predicate for ``HostState.diff``: a line naming another tier's throw-away
    object or another real cluster's, and nothing of run ``run_id``."""

    def foreign(line: str) -> bool:
        if any(m.group(1) == run_id for m in REAL_CLUSTER.finditer(line)):
            return False
        if REAL_CLUSTER.search(line):
            return True
        return OTHER_TIERS.search(line) is not None

    return foreign


# -- reading the host ------------------------------------------------------------------------------


def normalize_ruleset(text: str) -> tuple[str, ...]:
    """A ruleset dump without comments (timestamps) and with counters zeroed."""
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        lines.append(_COUNTERS.sub("[0:0]", line.rstrip()))
    return tuple(lines)


def normalize_network(text: str) -> tuple[str, ...]:
    return tuple(_LINK_STATS.sub("", line).rstrip() for line in text.splitlines() if line.strip())


def parse_mounts(text: str) -> tuple[str, ...]:
    """``source mountpoint fstype`` per line of /proc/self/mounts (options change by themselves:
    a remount of someone else's is not ours to see)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append(" ".join(parts[:3]))
    return tuple(out)


def parse_netns_list(text: str) -> tuple[str, ...]:
    return tuple(sorted(line.split()[0] for line in text.splitlines() if line.strip()))


def _run(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(  # noqa: S603 - fixed argument lists
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def read_sysctls(keys: Iterable[str] = WATCHED_SYSCTLS) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in keys:
        try:
            out[key] = Path("/proc/sys", key).read_text().strip()
        except OSError:
            continue  # not on this kernel (bridge-nf without br_netfilter): absent before and after
    return out


def read_rulesets() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, argv in RULESET_COMMANDS.items():
        text = _run(argv)
        if text is not None:
            out[name] = normalize_ruleset(text)
    return out


def read_network() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, argv in LINK_COMMANDS.items():
        text = _run(argv)
        if text is not None:
            out[name] = normalize_network(text)
    return out


def top_cgroups(root: Path = CGROUP_ROOT) -> tuple[str, ...]:
    """``<hierarchy>/<name>`` of every top-level cgroup of every hierarchy under ``root``."""
    out = []
    try:
        hierarchies = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return ()
    for h in hierarchies:
        try:
            out += [f"{h.name}/{d.name}" for d in h.iterdir() if d.is_dir()]
        except OSError:
            continue
    return tuple(sorted(out))


def process_start(pid: int) -> str | None:
    """``<pid>:<start ticks> <comm>``, or None when it is gone (a zombie included: it has
    exited and holds nothing but its exit status)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return f"{pid}:{fields[19]} {comm}"


def parents() -> dict[int, int]:
    """Each live process's parent."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        out[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def descendants(root: int | None = None) -> tuple[str, ...]:
    """Processes descended from ``root`` (default: this process), as ``process_start`` shows them."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        children.setdefault(ppid, []).append(pid)
    found: list[str] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        shown = process_start(pid)
        if shown is not None:
            found.append(shown)
        todo += children.get(pid, [])
    return tuple(sorted(found))


def capture() -> HostState:
    """The host as it is now (about half a second)."""
    return HostState(
        sysctls=read_sysctls(),
        rulesets=read_rulesets(),
        network=read_network(),
        mounts=parse_mounts(Path("/proc/self/mounts").read_text()),
        cgroups=top_cgroups(),
        netns=parse_netns_list(_run(("ip", "netns", "list")) or ""),
        processes=descendants(),
    )
