"""Render a redirect spec into iptables-restore text, rule for rule what istio-iptables writes.

Compute, then execute: this module only accumulates rules and prints them; it knows nothing of
namespaces or processes. The order of the rules follows istio-iptables' own (the conformance
vectors pin it), because order is semantics in iptables. Every token comes from a typed value
of the spec -- ints, enums, validated names and ``ipaddress`` objects -- never from raw input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..spec.model import DNS_AGENT_PORT, OUTBOUND_MARK, InterceptionMode, RedirectSpec
from ..spec.values import DnsServer
from .ruleset import Ruleset, TproxyRoute

Family = Literal[4, 6]
FAMILIES: tuple[Family, Family] = (4, 6)

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
DIVERT = "ISTIO_DIVERT"
TPROXY = "ISTIO_TPROXY"
DROP = "ISTIO_DROP"

INBOUND_PASSTHROUGH_V4 = "127.0.0.6/32"
INBOUND_PASSTHROUGH_V6 = "::6/128"
LOOPBACK_V6 = "::1/128"


@dataclass(slots=True)
class _Rule:
    table: str
    chain: str
    args: tuple[str, ...]
    position: int | None = None  # None: append (-A); N: insert (-I CHAIN N)

    def line(self) -> str:
        head = f"-A {self.chain}" if self.position is None else f"-I {self.chain} {self.position}"
        return " ".join((head, *self.args))


@dataclass(slots=True)
class _Builder:
    """Accumulates the rules of both families in order."""

    ipv6: bool
    v4: list[_Rule] = field(default_factory=list)
    v6: list[_Rule] = field(default_factory=list)

    def add(
        self, family: Family | None, table: str, chain: str, *args: str, position: int | None = None
    ) -> None:
        if family in (None, 4):
            self.v4.append(_Rule(table, chain, args, position))
        if family in (None, 6) and self.ipv6:
            self.v6.append(_Rule(table, chain, args, position))

    def add_versioned(self, v4: str, v6: str, table: str, chain: str, *args: str) -> None:
        """One rule for each family with ``{ip}`` replaced by that family's address."""
        self.add(4, table, chain, *(v4 if a == "{ip}" else a for a in args))
        self.add(6, table, chain, *(v6 if a == "{ip}" else a for a in args))


def restore_text(rules: Iterable[_Rule]) -> str:
    """iptables-restore text: tables in alphabetical order; each declares its chains (those with
    rules first, in order of appearance, then chains only jumped to), then its rules."""
    by_table: dict[str, list[_Rule]] = {}
    for rule in rules:
        by_table.setdefault(rule.table, []).append(rule)
    out: list[str] = []
    for table in sorted(by_table):
        table_rules = by_table[table]
        chains: dict[str, None] = {}
        for rule in table_rules:
            if rule.chain not in BUILTIN_CHAINS:
                chains.setdefault(rule.chain, None)
        for rule in table_rules:
            if len(rule.args) >= 2 and rule.args[-2] == "-j" and rule.args[-1].startswith("ISTIO_"):
                chains.setdefault(rule.args[-1], None)
        out.append(f"* {table}")
        out += [f"-N {chain}" for chain in chains]
        out += [rule.line() for rule in table_rules]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def render(spec: RedirectSpec) -> Ruleset:
    b = _Builder(ipv6=spec.ipv6)
    loopback_v4 = str(spec.host_ipv4_loopback_cidr)
    tproxy = spec.mode is InterceptionMode.TPROXY
    uids = [str(u) for u in spec.proxy_uids]
    gids = [str(g) for g in spec.proxy_gids]
    dns = spec.dns_enabled
    tunnel = str(spec.inbound_tunnel_port)

    # 1. Excluded interfaces: never captured, in either direction.
    for nic in spec.exclude_interfaces:
        b.add(None, "nat", "PREROUTING", "-i", nic, "-j", "RETURN")
        b.add(None, "nat", "OUTPUT", "-o", nic, "-j", "RETURN")
    if tproxy:
        for nic in spec.exclude_interfaces:
            b.add(None, "mangle", "PREROUTING", "-i", nic, "-j", "RETURN")
            b.add(None, "mangle", "OUTPUT", "-o", nic, "-j", "RETURN")

    # 2. Virtual interfaces: their inbound traffic is not treated as inbound.
    for nic in spec.reroute_virtual_interfaces:
        b.add(None, "nat", "PREROUTING", "-i", nic, "-j", "RETURN", position=1)

    # 3. Drop conntrack-INVALID packets instead of letting them reset connections.
    if spec.drop_invalid:
        b.add(None, "mangle", "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", DROP)
        b.add(None, "mangle", DROP, "-j", "DROP")

    # 4. Base chains.
    b.add(None, "nat", INBOUND, "-p", "tcp", "--dport", tunnel, "-j", "RETURN")
    b.add(None, "nat", REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(spec.proxy_port))
    b.add(
        None, "nat", IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(spec.inbound_capture_port)
    )

    # 5. Inbound.
    _inbound(b, spec, loopback_v4)

    # 6. Outbound: everything locally generated goes through ISTIO_OUTPUT.
    b.add(None, "nat", "OUTPUT", "-j", OUTPUT)
    for port in spec.outbound_ports_exclude:
        b.add(None, "nat", OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        b.add(None, "nat", OUTPUT, "-p", "udp", "--dport", str(port), "-j", "RETURN")
    b.add_versioned(
        INBOUND_PASSTHROUGH_V4,
        INBOUND_PASSTHROUGH_V6,
        "nat",
        OUTPUT,
        "-o",
        "lo",
        "-s",
        "{ip}",
        "-j",
        "RETURN",
    )

    # 7. The proxy's own traffic, per UID then per GID.
    loopback_included = spec.outbound_cidrs.has_loopback
    for kind, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            ports: tuple[str, ...] = ("!", "--dport", tunnel)
            if dns and kind == "--uid-owner":
                # Port 53 too: app -> agent DNS must not loop through the inbound listener.
                ports = ("-m", "multiport", "!", "--dports", f"53,{tunnel}")
            b.add_versioned(
                loopback_v4, LOOPBACK_V6, "nat", OUTPUT,
                "-o", "lo", "!", "-d", "{ip}", "-p", "tcp", *ports,
                "-m", "owner", kind, ident, "-j", IN_REDIRECT,
            )  # fmt: skip
            if not loopback_included:
                if dns:
                    b.add(None, "nat", OUTPUT, "-o", "lo", "-p", "tcp", "!", "--dport", "53",
                          "-m", "owner", "!", kind, ident, "-j", "RETURN")  # fmt: skip
                else:
                    b.add(None, "nat", OUTPUT, "-o", "lo", "-m", "owner", "!", kind, ident, "-j", "RETURN")
            b.add(None, "nat", OUTPUT, "-m", "owner", kind, ident, "-j", "RETURN")

    # 8. Owner groups.
    groups = spec.owner_groups
    if groups.except_:
        for group in groups.values:
            b.add(None, "nat", OUTPUT, "-m", "owner", "--gid-owner", group, "-j", "RETURN")
    else:
        matchers = [token for group in groups.values for token in ("-m", "owner", "!", "--gid-owner", group)]
        b.add(None, "nat", OUTPUT, *matchers, "-j", "RETURN")

    # 9. DNS.
    if dns:
        _dns(b, spec, uids, gids)

    # 10. Local destinations, excluded and included ranges.
    b.add_versioned(loopback_v4, LOOPBACK_V6, "nat", OUTPUT, "-d", "{ip}", "-j", "RETURN")
    for cidr in spec.outbound_cidrs_exclude:
        b.add(cidr.version, "nat", OUTPUT, "-d", str(cidr), "-j", "RETURN")
    for port in spec.outbound_ports_include:
        b.add(None, "nat", OUTPUT, "-p", "tcp", "--dport", str(port), "-j", REDIRECT)
    for family in FAMILIES:
        _outbound_include(b, spec, family)

    if tproxy:
        _tproxy_marks(b, spec, uids, gids, loopback_v4)

    return Ruleset(
        iptables=restore_text(b.v4),
        ip6tables=restore_text(b.v6) if spec.ipv6 else "",
        tproxy=TproxyRoute(spec.tproxy_mark, spec.tproxy_route_table) if tproxy else None,
        ipv6_passthrough_address=spec.ipv6,
    )


def _inbound(b: _Builder, spec: RedirectSpec, loopback_v4: str) -> None:
    if spec.inbound_ports.empty:
        return
    tproxy = spec.mode is InterceptionMode.TPROXY
    mark = str(spec.tproxy_mark)
    if tproxy:
        b.add(None, "mangle", DIVERT, "-j", "MARK", "--set-mark", mark)
        b.add(None, "mangle", DIVERT, "-j", "ACCEPT")
        b.add_versioned(
            loopback_v4, LOOPBACK_V6, "mangle", TPROXY,
            "!", "-d", "{ip}", "-p", "tcp", "-j", "TPROXY",
            "--tproxy-mark", f"{mark}/0xffffffff", "--on-port", str(spec.inbound_capture_port),
        )  # fmt: skip
    table = "mangle" if tproxy else "nat"
    b.add(None, table, "PREROUTING", "-p", "tcp", "-j", INBOUND)
    if spec.inbound_ports.wildcard:
        for port in spec.inbound_ports_exclude:
            b.add(None, table, INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        if tproxy:
            b.add(None, "mangle", INBOUND, "-p", "tcp", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                  "-j", DIVERT)  # fmt: skip
            b.add(None, "mangle", INBOUND, "-p", "tcp", "-j", TPROXY)
        else:
            b.add(None, "nat", INBOUND, "-p", "tcp", "-j", IN_REDIRECT)
        return
    for port in spec.inbound_ports.ports:
        if tproxy:
            b.add(None, "mangle", INBOUND, "-p", "tcp", "--dport", str(port), "-m", "conntrack", "--ctstate",
                  "RELATED,ESTABLISHED", "-j", DIVERT)  # fmt: skip
            b.add(None, "mangle", INBOUND, "-p", "tcp", "--dport", str(port), "-j", TPROXY)
        else:
            b.add(None, "nat", INBOUND, "-p", "tcp", "--dport", str(port), "-j", IN_REDIRECT)


def _dns(b: _Builder, spec: RedirectSpec, uids: list[str], gids: list[str]) -> None:
    agent = str(DNS_AGENT_PORT)
    capture_all = spec.capture_all_dns
    b.add(None, "raw", "OUTPUT", "-j", OUTPUT_DNS)
    if capture_all or spec.dns_servers_v4:
        b.add(4, "nat", OUTPUT, "-j", OUTPUT_DNS)
    if capture_all or spec.dns_servers_v6:
        b.add(6, "nat", OUTPUT, "-j", OUTPUT_DNS)
    servers = [*spec.dns_servers_v4, *spec.dns_servers_v6]
    # TCP then UDP; istio-iptables spells the UDP target's option --to-port (an alias).
    for proto, to_ports in (("tcp", "--to-ports"), ("udp", "--to-port")):
        if capture_all:
            b.add(None, "nat", OUTPUT_DNS, "-p", proto, "--dport", "53", "-j", "REDIRECT", to_ports, agent)
            continue
        for server in servers:
            prefix = 32 if server.version == 4 else 128
            b.add(server.version, "nat", OUTPUT_DNS, "-p", proto, "--dport", "53", "-d",
                  f"{server.text}/{prefix}", "-j", "REDIRECT", to_ports, agent)  # fmt: skip

    # Conntrack zones keep the proxy's upstream DNS flows apart from the app's.
    for kind, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            b.add(None, "raw", OUTPUT_DNS, "-p", "udp", "--dport", "53", "-m", "owner", kind, ident,
                  "-j", "CT", "--zone", "1")  # fmt: skip
            b.add(None, "raw", OUTPUT_DNS, "-p", "udp", "--sport", agent, "-m", "owner", kind, ident,
                  "-j", "CT", "--zone", "2")  # fmt: skip
    if capture_all:
        b.add(None, "raw", "PREROUTING", "-j", INBOUND)
        b.add(None, "raw", OUTPUT_DNS, "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
        b.add(None, "raw", INBOUND, "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
        return
    families: tuple[tuple[Family, tuple[DnsServer, ...]], ...] = (
        (4, spec.dns_servers_v4),
        (6, spec.dns_servers_v6),
    )
    for family, family_servers in families:
        if family_servers:
            b.add(family, "raw", "PREROUTING", "-j", INBOUND)
        for server in family_servers:
            address = f"{server.text}/{32 if family == 4 else 128}"
            b.add(
                family,
                "raw",
                OUTPUT_DNS,
                "-p",
                "udp",
                "--dport",
                "53",
                "-d",
                address,
                "-j",
                "CT",
                "--zone",
                "2",
            )
            b.add(
                family, "raw", INBOUND, "-p", "udp", "--sport", "53", "-s", address, "-j", "CT", "--zone", "1"
            )


def _outbound_include(b: _Builder, spec: RedirectSpec, family: Family) -> None:
    selection = spec.outbound_cidrs
    if selection.wildcard:
        b.add(family, "nat", OUTPUT, "-j", REDIRECT)
        for nic in spec.reroute_virtual_interfaces:
            b.add(family, "nat", "PREROUTING", "-i", nic, "-j", REDIRECT, position=1)
        return
    for cidr in selection.of_version(family):
        for nic in spec.reroute_virtual_interfaces:
            b.add(family, "nat", "PREROUTING", "-i", nic, "-d", str(cidr), "-j", REDIRECT, position=1)
        b.add(family, "nat", OUTPUT, "-d", str(cidr), "-j", REDIRECT)


def _tproxy_marks(
    b: _Builder, spec: RedirectSpec, uids: list[str], gids: list[str], loopback_v4: str
) -> None:
    mark = str(spec.tproxy_mark)
    outbound_mark = str(OUTBOUND_MARK)
    b.add(
        None,
        "mangle",
        "PREROUTING",
        "-p",
        "tcp",
        "-m",
        "mark",
        "--mark",
        mark,
        "-j",
        "CONNMARK",
        "--save-mark",
    )
    b.add(None, "mangle", "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
    for kind, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            b.add_versioned(
                loopback_v4, LOOPBACK_V6, "mangle", "OUTPUT",
                "!", "-d", "{ip}", "-p", "tcp", "-o", "lo", "-m", "owner", kind, ident,
                "-j", "MARK", "--set-mark", outbound_mark,
            )  # fmt: skip
    b.add(
        None,
        "mangle",
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "connmark",
        "--mark",
        mark,
        "-j",
        "CONNMARK",
        "--restore-mark",
    )
    b.add(None, "mangle", INBOUND, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN", position=1)
    b.add(
        4,
        "mangle",
        INBOUND,
        "-p",
        "tcp",
        "-s",
        INBOUND_PASSTHROUGH_V4,
        "-i",
        "lo",
        "-j",
        "RETURN",
        position=2,
    )
    b.add(
        6,
        "mangle",
        INBOUND,
        "-p",
        "tcp",
        "-s",
        INBOUND_PASSTHROUGH_V6,
        "-i",
        "lo",
        "-j",
        "RETURN",
        position=2,
    )
    b.add(None, "mangle", INBOUND, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", outbound_mark,
          "-j", "RETURN", position=3)  # fmt: skip
