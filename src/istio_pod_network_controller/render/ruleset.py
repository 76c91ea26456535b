"""The rendered result for one pod: what the node side applies and verifies.

A plain value, produced by ``render.render(spec)`` and consumed by ``node.apply``; it knows
nothing of namespaces or processes. It holds structured rules (``rules.FamilyRules``), not text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .rules import FamilyRules

# The chains istio-iptables creates, by the names it gives them.
INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
DIVERT = "ISTIO_DIVERT"
TPROXY = "ISTIO_TPROXY"
DROP = "ISTIO_DROP"

# Every chain we may create, per table. Re-applying removes exactly these (and our jumps into
# them) before writing the new ruleset, so rules that others put in a namespace are left alone.
OWN_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": (INBOUND, REDIRECT, IN_REDIRECT, OUTPUT, OUTPUT_DNS),
    "mangle": (DIVERT, TPROXY, INBOUND, DROP),
    "raw": (OUTPUT_DNS, INBOUND),
}


@dataclass(frozen=True, slots=True)
class TproxyRoute:
    """The policy route TPROXY mode needs: ``ip rule add fwmark MARK lookup TABLE`` and
    ``ip route add local default dev lo table TABLE`` (for each family in use)."""

    mark: int
    table: int


@dataclass(frozen=True, slots=True)
class Ruleset:
    """The rules of each family (``v6`` empty when IPv6 is off), plus what TPROXY and IPv6 need
    outside iptables. Restore text is printed on demand, from the rules."""

    v4: FamilyRules
    v6: FamilyRules
    tproxy: TproxyRoute | None = None
    # istio-iptables adds ::6/128 to lo when IPv6 is on: the inbound passthrough source address
    # (127.0.0.6 needs nothing, 127/8 is all on lo already).
    ipv6_passthrough_address: bool = False

    @classmethod
    def from_restore_text(
        cls,
        iptables: str,
        ip6tables: str,
        *,
        tproxy: TproxyRoute | None = None,
        ipv6_passthrough_address: bool = False,
    ) -> Ruleset:
        """A ruleset written as restore text (by hand, or by the ``rules`` command); raises
        RulesetFormatError for forms the renderer does not write."""
        return cls(
            FamilyRules.from_restore_text(iptables),
            FamilyRules.from_restore_text(ip6tables),
            tproxy,
            ipv6_passthrough_address,
        )

    @property
    def iptables(self) -> str:
        """IPv4 iptables-restore text (``--noflush`` form, ``* table`` ... ``COMMIT``); "" when
        IPv4 gets no rules."""
        return self.v4.restore_text()

    @property
    def ip6tables(self) -> str:
        """IPv6 iptables-restore text; "" when IPv6 gets no rules."""
        return self.v6.restore_text()

    def sha256(self) -> str:
        """Identifies the ruleset in a pod's mark. Hashes the restore texts, so that it keeps its
        value across versions that print the same rules, however they hold them."""
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
        return len(self.v4.rules) + len(self.v6.rules)
