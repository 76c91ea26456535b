"""Throwaway network namespaces and the kernel state tests compare in them: nftables rulesets
(``nft -j``, counters zeroed, handles dropped), iptables-save text, policy routes and addresses.

Commands run in a private mount namespace too, so a test can give them its own /etc/group
(Istio's test data names groups this machine may lack) or /etc/resolv.conf (Istio's
istio-iptables reads the DNS servers from it) without touching the host's files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# The PID keeps the leak check to this run: other runs may have namespaces in flight.
NETNS_PREFIX = f"ipnc-nft-{os.getpid()}-"
TIMEOUT = 30
# Groups Istio's test cases name (and one spelled like an nft keyword), added to a private copy
# of /etc/group when missing.
TEST_GROUPS = {"java": 50201, "ftp": 50202, "counter": 50203}
MARKER_COMMENT = "-m comment --comment istio-pod-network-controller "
# `ip rule`/`ip route` protocol our node side stamps on what it adds (Istio's have none).
OUR_ROUTE_PROTO = " proto 137"

# `sh -c` prologue: bind-mount SRC over DST for each pair before `--`, then run the rest.
_BIND_AND_EXEC = (
    'while [ "$1" != "--" ]; do mount --bind "$1" "$2" || exit 97; shift 2; done; shift; exec "$@"'
)


def needs_root_and(*binaries: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root")
    for binary in ("ip", "nsenter", "unshare", *binaries):
        if shutil.which(binary) is None:
            pytest.skip(f"kernel tests need {binary}")


def group_file(folder: Path) -> Path:
    """A copy of /etc/group with the test groups added."""
    text = Path("/etc/group").read_text()
    have = {line.split(":", 1)[0] for line in text.splitlines() if line}
    extra = "".join(f"{name}:x:{gid}:\n" for name, gid in TEST_GROUPS.items() if name not in have)
    path = folder / "group"
    path.write_text(text if text.endswith("\n") else text + "\n")
    with path.open("a") as out:
        out.write(extra)
    return path


@contextmanager
def netns(*, ipv6_address: bool = False) -> Iterator[str]:
    """A fresh named network namespace with lo up and one non-loopback address on lo (IPv4, or
    IPv6 only with ``ipv6_address``: istio-iptables decides on IPv6 from the pod's address);
    removed afterwards. Yields its path."""
    name = NETNS_PREFIX + uuid.uuid4().hex[:10]
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        if ipv6_address:
            _ip("-n", name, "addr", "add", "fd00:99::2/128", "dev", "lo", "nodad")
        else:
            _ip("-n", name, "addr", "add", "10.99.0.2/32", "dev", "lo")
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=TIMEOUT)  # noqa: S603


def leftover_namespaces() -> list[str]:
    found = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=TIMEOUT)
    return [line.split()[0] for line in found.stdout.splitlines() if line.startswith(NETNS_PREFIX)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=TIMEOUT)  # noqa: S603


def run_in(
    path: str | None,
    argv: Sequence[str],
    *,
    binds: Mapping[str, Path] | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``argv`` in the network namespace at ``path`` (None: this one) and a private mount
    namespace where each ``binds`` target (/etc/group, ...) shows the given file."""
    pairs = [arg for target, source in (binds or {}).items() for arg in (str(source), target)]
    enter = ["nsenter", f"--net={path}"] if path is not None else []
    command = [
        *enter, "unshare", "--mount", "--propagation", "private",
        "sh", "-c", _BIND_AND_EXEC, "sh", *pairs, "--", *argv,
    ]  # fmt: skip
    base = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    return subprocess.run(  # noqa: S603
        command, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, env={**base, **(env or {})}
    )


def checked(run: subprocess.CompletedProcess[str], what: str) -> str:
    assert run.returncode == 0, f"{what} failed ({run.returncode}): {run.stderr.strip()[-2000:]}"
    return run.stdout


def nft_ruleset(path: str) -> list[dict[str, Any]]:
    """The namespace's nftables ruleset as ``nft -j`` objects, without the metainfo, handles and
    counter values (which differ between equal rulesets)."""
    listed = json.loads(checked(run_in(path, ["nft", "-j", "list", "ruleset"]), "nft list ruleset"))
    out: list[dict[str, Any]] = []
    for item in listed["nftables"]:
        if "metainfo" in item:
            continue
        out.append(_without_volatile(item))
    return out


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        if "counter" in value and isinstance(value["counter"], dict):
            return {"counter": {"packets": 0, "bytes": 0}}
        return {k: _without_volatile(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def load_nft(text: str, groups: Path) -> list[dict[str, Any]]:
    """``text`` loaded by ``nft -f`` into a fresh namespace: the ruleset the kernel then holds."""
    with netns() as path:
        checked(run_in(path, ["nft", "-f", "-"], binds={"/etc/group": groups}, stdin=text), "nft -f")
        return nft_ruleset(path)


def try_load_nft(text: str, groups: Path) -> subprocess.CompletedProcess[str]:
    with netns() as path:
        return run_in(path, ["nft", "-f", "-"], binds={"/etc/group": groups}, stdin=text)


def iptables_state(path: str) -> dict[str, list[str]]:
    """iptables-save and ip6tables-save per table: rules and user chains, our marker comment
    taken out; tables without a rule or a chain of their own left out (istio-iptables leaves an
    empty IPv6 nat table behind on IPv4-only pods: registered, but it holds nothing)."""
    state: dict[str, list[str]] = {}
    for family, save in (("v4", "iptables-save"), ("v6", "ip6tables-save")):
        text = checked(run_in(path, [save]), save)
        table = ""
        lines: list[str] = []
        for line in text.splitlines():
            if line.startswith("*"):
                table, lines = line[1:], []
            elif line == "COMMIT":
                if any(not re.match(r":[A-Z]+ ACCEPT", entry) for entry in lines):
                    state[f"{family} {table}"] = lines
            elif line.startswith(":"):
                lines.append(" ".join(line.split()[:2]))
            elif line.startswith("-A"):
                lines.append(line.replace(MARKER_COMMENT, ""))
    return state


def routing_state(path: str) -> dict[str, list[str]]:
    """Policy rules, the routes of every table but main/local, and lo's addresses: what TPROXY
    and IPv6 need outside the packet filter. Our route protocol stamp is taken out."""
    state: dict[str, list[str]] = {}
    for key, argv in {
        "rules v4": ["ip", "-4", "rule", "show"],
        "rules v6": ["ip", "-6", "rule", "show"],
        "routes v4": ["ip", "-4", "route", "show", "table", "all"],
        "routes v6": ["ip", "-6", "route", "show", "table", "all"],
        "lo v6": ["ip", "-6", "-o", "addr", "show", "dev", "lo"],
    }.items():
        out = checked(run_in(path, argv), " ".join(argv))
        lines = [" ".join(line.replace(OUR_ROUTE_PROTO, "").split()) for line in out.splitlines()]
        if key.startswith("routes"):
            lines = [line for line in lines if "table local" not in line and "table" in line]
        if key == "lo v6":
            lines = [line.split()[3] for line in lines]
        state[key] = sorted(lines)
    return state
