"""The rendered result for one pod: what the node side applies and verifies.

A plain value, produced by ``render.render(spec)`` and consumed by ``node.apply``; it knows
nothing of namespaces or processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Every chain we may create, per table. Re-applying removes exactly these (and our jumps into
# them) before writing the new ruleset, so rules that others put in a namespace are left alone.
OWN_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS"),
    "mangle": ("ISTIO_DIVERT", "ISTIO_TPROXY", "ISTIO_INBOUND", "ISTIO_DROP"),
    "raw": ("ISTIO_OUTPUT_DNS", "ISTIO_INBOUND"),
}


@dataclass(frozen=True, slots=True)
class TproxyRoute:
    """The policy route TPROXY mode needs: ``ip rule add fwmark MARK lookup TABLE`` and
    ``ip route add local default dev lo table TABLE`` (for each family in use)."""

    mark: int
    table: int


@dataclass(frozen=True, slots=True)
class Ruleset:
    """iptables-restore texts (``--noflush`` form, ``*table`` ... ``COMMIT``); "" when a family
    gets no rules."""

    iptables: str
    ip6tables: str
    tproxy: TproxyRoute | None = None
    # istio-iptables adds ::6/128 to lo when IPv6 is on: the inbound passthrough source address
    # (127.0.0.6 needs nothing, 127/8 is all on lo already).
    ipv6_passthrough_address: bool = False

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for part in (
            self.iptables,
            "\0",
            self.ip6tables,
            "\0",
            repr(self.tproxy),
            repr(self.ipv6_passthrough_address),
        ):
            digest.update(part.encode())
        return digest.hexdigest()

    def rule_count(self) -> int:
        return sum(
            1
            for text in (self.iptables, self.ip6tables)
            for line in text.splitlines()
            if line.startswith(("-A ", "-I "))
        )
