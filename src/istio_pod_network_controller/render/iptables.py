"""Render a redirect spec into rules, rule for rule what istio-iptables writes.

Compute, then execute: this module only accumulates ``rules.Rule`` values; it knows nothing of
namespaces, processes or restore text. The order of the rules follows istio-iptables' own (the
conformance vectors pin it), because order is semantics in iptables. Every token comes from a typed value
of the spec -- ints, enums, validated names and ``ipaddress`` objects -- never from raw input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..spec.errors import SpecError, too_many_rules
from ..spec.limits import MAX_RULES
from ..spec.model import DNS_AGENT_PORT, OUTBOUND_MARK, InterceptionMode, RedirectSpec
from ..spec.values import DnsServer, Port, PortRange
from .rules import FamilyRules, Rule
from .ruleset import (
    DIVERT,
    DROP,
    IN_REDIRECT,
    INBOUND,
    OUTPUT,
    OUTPUT_DNS,
    REDIRECT,
    TPROXY,
    Ruleset,
    TproxyRoute,
)

IpVersion = Literal[4, 6]  # the address family, as the spec's addresses give it
IP_VERSIONS: tuple[IpVersion, IpVersion] = (4, 6)

INBOUND_PASSTHROUGH_V4 = "127.0.0.6/32"
INBOUND_PASSTHROUGH_V6 = "::6/128"
LOOPBACK_V6 = "::1/128"

# iptables-restore refuses a line of more than 255 arguments: the included owner groups make one
# rule of five arguments per group, so 49 is the most that loads (in istio-iptables too).
MAX_IPTABLES_OWNER_GROUPS = 49


@dataclass(slots=True)
class _Builder:
    """Accumulates the rules of both families in order."""

    ipv6: bool
    v4: list[Rule] = field(default_factory=list)
    v6: list[Rule] = field(default_factory=list)

    def add(
        self,
        family: IpVersion | None,
        table: str,
        chain: str,
        *match: str,
        jump: str,
        options: tuple[str, ...] = (),
        position: int | None = None,
    ) -> None:
        """One rule for ``family`` (both when None): ``-A``/``-I CHAIN POSITION``, the match
        tokens as iptables spells them, ``-j JUMP`` and the target's options."""
        rule = Rule(table, chain, match, jump, options, position)
        if family in (None, 4):
            self.v4.append(rule)
        if family in (None, 6) and self.ipv6:
            self.v6.append(rule)
        if len(self.v4) + len(self.v6) > MAX_RULES:
            raise too_many_rules(MAX_RULES)

    def add_versioned(
        self, v4: str, v6: str, table: str, chain: str, *match: str, jump: str, options: tuple[str, ...] = ()
    ) -> None:
        """One rule for each family with ``{ip}`` in the match replaced by that family's address."""
        self.add(4, table, chain, *(v4 if a == "{ip}" else a for a in match), jump=jump, options=options)
        self.add(6, table, chain, *(v6 if a == "{ip}" else a for a in match), jump=jump, options=options)


def _port(port: Port) -> str:
    """A port or a range as iptables writes it (``8000:8010``)."""
    return f"{port.low}:{port.high}" if isinstance(port, PortRange) else str(port)


def check_iptables_mode(spec: RedirectSpec) -> None:
    """Raise SpecError for what iptables mode cannot write although the spec holds it (and
    istio-iptables' iptables mode fails on too): nft's range spelling where a port is written,
    too many included owner groups."""
    # The excluded inbound ports are written only with '*' (istio-iptables ignores them otherwise).
    excluded = spec.inbound_ports_exclude if spec.inbound_ports.wildcard else ()
    lists: tuple[tuple[str, tuple[Port, ...]], ...] = (
        ("-b", spec.inbound_ports.ports),
        ("-d", excluded),
        ("-q", spec.outbound_ports_include),
        ("-o", spec.outbound_ports_exclude),
        ("-e", (spec.inbound_tunnel_port,)),
    )
    for flag, ports in lists:
        for port in ports:
            if isinstance(port, PortRange) and port.separator == "-":
                raise SpecError(
                    flag, str(port), f"nft's range spelling: iptables mode writes {port.low}:{port.high}"
                )
    groups = spec.owner_groups
    if not groups.except_ and len(groups.values) > MAX_IPTABLES_OWNER_GROUPS:
        raise SpecError(
            "--owner-groups-include",
            ",".join(groups.values),
            f"{len(groups.values)} groups: iptables mode matches them in one rule, which iptables-restore "
            f"refuses beyond {MAX_IPTABLES_OWNER_GROUPS} groups (native nftables mode takes up to 64)",
        )


def render(spec: RedirectSpec) -> Ruleset:
    """The iptables rules for ``spec``; raises SpecError where iptables mode cannot write it."""
    check_iptables_mode(spec)
    b = _Builder(ipv6=spec.ipv6)
    loopback_v4 = str(spec.host_ipv4_loopback_cidr)
    tproxy = spec.mode is InterceptionMode.TPROXY
    uids = [str(u) for u in spec.proxy_uids]
    gids = [str(g) for g in spec.proxy_gids]
    dns = spec.dns_enabled
    tunnel = _port(spec.inbound_tunnel_port)

    # 1. Excluded interfaces: never captured, in either direction.
    for nic in spec.exclude_interfaces:
        b.add(None, "nat", "PREROUTING", "-i", nic, jump="RETURN")
        b.add(None, "nat", "OUTPUT", "-o", nic, jump="RETURN")
    if tproxy:
        for nic in spec.exclude_interfaces:
            b.add(None, "mangle", "PREROUTING", "-i", nic, jump="RETURN")
            b.add(None, "mangle", "OUTPUT", "-o", nic, jump="RETURN")

    # 2. Virtual interfaces: their inbound traffic is not treated as inbound.
    for nic in spec.reroute_virtual_interfaces:
        b.add(None, "nat", "PREROUTING", "-i", nic, jump="RETURN", position=1)

    # 3. Drop conntrack-INVALID packets instead of letting them reset connections.
    if spec.drop_invalid:
        b.add(None, "mangle", "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", jump=DROP)
        b.add(None, "mangle", DROP, jump="DROP")

    # 4. Base chains.
    b.add(None, "nat", INBOUND, "-p", "tcp", "--dport", tunnel, jump="RETURN")
    b.add(None, "nat", REDIRECT, "-p", "tcp", jump="REDIRECT", options=("--to-ports", str(spec.proxy_port)))
    b.add(None, "nat", IN_REDIRECT, "-p", "tcp", jump="REDIRECT",
          options=("--to-ports", str(spec.inbound_capture_port)))  # fmt: skip

    # 5. Inbound.
    _inbound(b, spec, loopback_v4)

    # 6. Outbound: everything locally generated goes through ISTIO_OUTPUT.
    b.add(None, "nat", "OUTPUT", jump=OUTPUT)
    for port in spec.outbound_ports_exclude:
        b.add(None, "nat", OUTPUT, "-p", "tcp", "--dport", _port(port), jump="RETURN")
        b.add(None, "nat", OUTPUT, "-p", "udp", "--dport", _port(port), jump="RETURN")
    b.add_versioned(
        INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, "nat", OUTPUT, "-o", "lo", "-s", "{ip}", jump="RETURN"
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
                "-m", "owner", kind, ident, jump=IN_REDIRECT,
            )  # fmt: skip
            if not loopback_included:
                if dns:
                    b.add(None, "nat", OUTPUT, "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner",
                          "!", kind, ident, jump="RETURN")  # fmt: skip
                else:
                    b.add(None, "nat", OUTPUT, "-o", "lo", "-m", "owner", "!", kind, ident, jump="RETURN")
            b.add(None, "nat", OUTPUT, "-m", "owner", kind, ident, jump="RETURN")

    # 8. Owner groups.
    groups = spec.owner_groups
    if groups.except_:
        for group in groups.values:
            b.add(None, "nat", OUTPUT, "-m", "owner", "--gid-owner", group, jump="RETURN")
    else:
        matchers = [token for group in groups.values for token in ("-m", "owner", "!", "--gid-owner", group)]
        b.add(None, "nat", OUTPUT, *matchers, jump="RETURN")

    # 9. DNS.
    if dns:
        _dns(b, spec, uids, gids)

    # 10. Local destinations, excluded and included ranges.
    b.add_versioned(loopback_v4, LOOPBACK_V6, "nat", OUTPUT, "-d", "{ip}", jump="RETURN")
    for cidr in spec.outbound_cidrs_exclude:
        b.add(cidr.version, "nat", OUTPUT, "-d", str(cidr), jump="RETURN")
    for port in spec.outbound_ports_include:
        b.add(None, "nat", OUTPUT, "-p", "tcp", "--dport", _port(port), jump=REDIRECT)
    for family in IP_VERSIONS:
        _outbound_include(b, spec, family)

    if tproxy:
        _tproxy_marks(b, spec, uids, gids, loopback_v4)

    return Ruleset(
        v4=FamilyRules.of(b.v4),
        v6=FamilyRules.of(b.v6),
        # As istio-iptables: the policy route only when some inbound port is captured (nothing
        # else is marked for it).
        tproxy=(
            TproxyRoute(spec.tproxy_mark, spec.tproxy_route_table)
            if tproxy and not spec.inbound_ports.empty
            else None
        ),
        ipv6_passthrough_address=spec.ipv6,
    )


def _inbound(b: _Builder, spec: RedirectSpec, loopback_v4: str) -> None:
    if spec.inbound_ports.empty:
        return
    tproxy = spec.mode is InterceptionMode.TPROXY
    mark = str(spec.tproxy_mark)
    if tproxy:
        b.add(None, "mangle", DIVERT, jump="MARK", options=("--set-mark", mark))
        b.add(None, "mangle", DIVERT, jump="ACCEPT")
        b.add_versioned(
            loopback_v4, LOOPBACK_V6, "mangle", TPROXY,
            "!", "-d", "{ip}", "-p", "tcp", jump="TPROXY",
            options=("--tproxy-mark", f"{mark}/0xffffffff", "--on-port", str(spec.inbound_capture_port)),
        )  # fmt: skip
    table = "mangle" if tproxy else "nat"
    b.add(None, table, "PREROUTING", "-p", "tcp", jump=INBOUND)
    if spec.inbound_ports.wildcard:
        for port in spec.inbound_ports_exclude:
            b.add(None, table, INBOUND, "-p", "tcp", "--dport", _port(port), jump="RETURN")
        if tproxy:
            b.add(None, "mangle", INBOUND, "-p", "tcp", "-m", "conntrack", "--ctstate",
                  "RELATED,ESTABLISHED", jump=DIVERT)  # fmt: skip
            b.add(None, "mangle", INBOUND, "-p", "tcp", jump=TPROXY)
        else:
            b.add(None, "nat", INBOUND, "-p", "tcp", jump=IN_REDIRECT)
        return
    for included in spec.inbound_ports.ports:
        dport = _port(included)
        if tproxy:
            b.add(None, "mangle", INBOUND, "-p", "tcp", "--dport", dport, "-m", "conntrack",
                  "--ctstate", "RELATED,ESTABLISHED", jump=DIVERT)  # fmt: skip
            b.add(None, "mangle", INBOUND, "-p", "tcp", "--dport", dport, jump=TPROXY)
        else:
            b.add(None, "nat", INBOUND, "-p", "tcp", "--dport", dport, jump=IN_REDIRECT)


def _dns(b: _Builder, spec: RedirectSpec, uids: list[str], gids: list[str]) -> None:
    agent = str(DNS_AGENT_PORT)
    capture_all = spec.capture_all_dns
    b.add(None, "raw", "OUTPUT", jump=OUTPUT_DNS)
    if capture_all or spec.dns_servers_v4:
        b.add(4, "nat", OUTPUT, jump=OUTPUT_DNS)
    if capture_all or spec.dns_servers_v6:
        b.add(6, "nat", OUTPUT, jump=OUTPUT_DNS)
    servers = [*spec.dns_servers_v4, *spec.dns_servers_v6]
    # TCP then UDP; istio-iptables spells the UDP target's option --to-port (an alias).
    for proto, to_ports in (("tcp", "--to-ports"), ("udp", "--to-port")):
        if capture_all:
            b.add(None, "nat", OUTPUT_DNS, "-p", proto, "--dport", "53", jump="REDIRECT",
                  options=(to_ports, agent))  # fmt: skip
            continue
        for server in servers:
            prefix = 32 if server.version == 4 else 128
            b.add(server.version, "nat", OUTPUT_DNS, "-p", proto, "--dport", "53", "-d",
                  f"{server.text}/{prefix}", jump="REDIRECT", options=(to_ports, agent))  # fmt: skip

    # Conntrack zones keep the proxy's upstream DNS flows apart from the app's.
    for kind, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            b.add(None, "raw", OUTPUT_DNS, "-p", "udp", "--dport", "53", "-m", "owner", kind, ident,
                  jump="CT", options=("--zone", "1"))  # fmt: skip
            b.add(None, "raw", OUTPUT_DNS, "-p", "udp", "--sport", agent, "-m", "owner", kind, ident,
                  jump="CT", options=("--zone", "2"))  # fmt: skip
    if capture_all:
        b.add(None, "raw", "PREROUTING", jump=INBOUND)
        b.add(None, "raw", OUTPUT_DNS, "-p", "udp", "--dport", "53", jump="CT", options=("--zone", "2"))
        b.add(None, "raw", INBOUND, "-p", "udp", "--sport", "53", jump="CT", options=("--zone", "1"))
        return
    families: tuple[tuple[IpVersion, tuple[DnsServer, ...]], ...] = (
        (4, spec.dns_servers_v4),
        (6, spec.dns_servers_v6),
    )
    for family, family_servers in families:
        if family_servers:
            b.add(family, "raw", "PREROUTING", jump=INBOUND)
        for server in family_servers:
            address = f"{server.text}/{32 if family == 4 else 128}"
            b.add(family, "raw", OUTPUT_DNS, "-p", "udp", "--dport", "53", "-d", address, jump="CT",
                  options=("--zone", "2"))  # fmt: skip
            b.add(family, "raw", INBOUND, "-p", "udp", "--sport", "53", "-s", address, jump="CT",
                  options=("--zone", "1"))  # fmt: skip


def _outbound_include(b: _Builder, spec: RedirectSpec, family: IpVersion) -> None:
    selection = spec.outbound_cidrs
    if selection.wildcard:
        b.add(family, "nat", OUTPUT, jump=REDIRECT)
        for nic in spec.reroute_virtual_interfaces:
            b.add(family, "nat", "PREROUTING", "-i", nic, jump=REDIRECT, position=1)
        return
    for cidr in selection.of_version(family):
        for nic in spec.reroute_virtual_interfaces:
            b.add(family, "nat", "PREROUTING", "-i", nic, "-d", str(cidr), jump=REDIRECT, position=1)
        b.add(family, "nat", OUTPUT, "-d", str(cidr), jump=REDIRECT)


def _tproxy_marks(
    b: _Builder, spec: RedirectSpec, uids: list[str], gids: list[str], loopback_v4: str
) -> None:
    mark = str(spec.tproxy_mark)
    outbound_mark = str(OUTBOUND_MARK)
    b.add(None, "mangle", "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", mark, jump="CONNMARK",
          options=("--save-mark",))  # fmt: skip
    b.add(None, "mangle", "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, jump="RETURN")
    for kind, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            b.add_versioned(
                loopback_v4, LOOPBACK_V6, "mangle", "OUTPUT",
                "!", "-d", "{ip}", "-p", "tcp", "-o", "lo", "-m", "owner", kind, ident,
                jump="MARK", options=("--set-mark", outbound_mark),
            )  # fmt: skip
    b.add(None, "mangle", "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", mark, jump="CONNMARK",
          options=("--restore-mark",))  # fmt: skip
    b.add(None, "mangle", INBOUND, "-p", "tcp", "-m", "mark", "--mark", mark, jump="RETURN", position=1)
    b.add(4, "mangle", INBOUND, "-p", "tcp", "-s", INBOUND_PASSTHROUGH_V4, "-i", "lo", jump="RETURN",
          position=2)  # fmt: skip
    b.add(6, "mangle", INBOUND, "-p", "tcp", "-s", INBOUND_PASSTHROUGH_V6, "-i", "lo", jump="RETURN",
          position=2)  # fmt: skip
    b.add(None, "mangle", INBOUND, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", outbound_mark,
          jump="RETURN", position=3)  # fmt: skip
