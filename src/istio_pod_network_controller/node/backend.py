"""Which iptables backend (nf_tables or legacy) the node uses, and its binaries.

A pod's rules must live in the same backend as the node's (kube-proxy, CNI), or the two sets of
tables silently coexist and the kernel runs both. The backend that already holds rules on the host
wins; with none holding any, the system's default ``iptables`` decides; a flag can force one.
"""

from __future__ import annotations

import enum
import shutil
import subprocess
from dataclasses import dataclass

from .errors import BackendError
from .netns import Netns


class Backend(enum.Enum):
    NFT = "nft"
    LEGACY = "legacy"


class Family(enum.Enum):
    """Address family; the value is the tool prefix and the Ruleset field name."""

    IPV4 = "iptables"
    IPV6 = "ip6tables"


@dataclass(frozen=True, slots=True)
class Tools:
    """Absolute paths of one backend's save and restore binaries, per family."""

    backend: Backend
    save: dict[Family, str]
    restore: dict[Family, str]

    def restore_argv(self, family: Family, *, noflush: bool = True, wait_seconds: int = 30) -> list[str]:
        argv = [self.restore[family]]
        if noflush:
            argv.append("--noflush")
        argv.append(f"--wait={int(wait_seconds)}")
        return argv

    def save_argv(self, family: Family) -> list[str]:
        return [self.save[family]]


def _which(name: str) -> str | None:
    return shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin")


def tools(backend: Backend) -> Tools:
    save: dict[Family, str] = {}
    restore: dict[Family, str] = {}
    for family in Family:
        for kind, table in (("save", save), ("restore", restore)):
            name = f"{family.value}-{backend.value}-{kind}"
            path = _which(name)
            if path is None:
                raise BackendError("backend", f"{name} is not installed on this node")
            table[family] = path
    return Tools(backend, save, restore)


def count_rules(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


def _save(argv: list[str], host: Netns | None) -> str:
    command = host.argv(argv) if host is not None else argv
    fds = (host.fileno(),) if host is not None else ()
    done = subprocess.run(  # noqa: S603 -- fixed binaries found on PATH
        command, capture_output=True, text=True, timeout=30, pass_fds=fds, check=False
    )
    return done.stdout if done.returncode == 0 else ""


def system_default() -> Backend | None:
    """What plain ``iptables`` is on this node, from ``iptables --version``."""
    path = _which("iptables")
    if path is None:
        return None
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    if "nf_tables" in done.stdout:
        return Backend.NFT
    if "legacy" in done.stdout:
        return Backend.LEGACY
    return None


def detect(*, host: Netns | None = None, forced: Backend | None = None) -> Tools:
    """Choose the backend: ``forced`` if given; else the one whose host tables hold more rules;
    else the system default; else whichever is installed. ``host`` is the host's network
    namespace (None: the agent's own, which is the host's under hostNetwork)."""
    if forced is not None:
        return tools(forced)
    counts: dict[Backend, int] = {}
    for backend in Backend:
        try:
            found = tools(backend)
        except BackendError:
            continue
        counts[backend] = sum(count_rules(_save(found.save_argv(f), host)) for f in Family)
    if not counts:
        raise BackendError("backend", "neither iptables-nft nor iptables-legacy is installed")
    best = max(counts.values())
    if best > 0:
        holders = [b for b in Backend if counts.get(b) == best]
        return tools(holders[0])
    default = system_default()
    if default is not None and default in counts:
        return tools(default)
    return tools(next(iter(counts)))
