"""Render a redirect spec into the nftables ruleset Istio's native nftables mode writes.

``istio-iptables --native-nftables`` programs three ``inet`` tables: ``istio-proxy-nat`` always,
``istio-proxy-mangle`` for TPROXY and drop-invalid, ``istio-proxy-raw`` for DNS capture. Each holds
base chains ``prerouting``/``output`` and regular ``istio-*`` chains, every rule counts, and one
transaction replaces them (add table, flush table, rebuild). This module computes that ruleset as
values -- tables, chains with their hooks, rules as typed statements -- in Istio's order, and
prints the ``nft -f`` text on demand; it runs nothing. The conformance vectors in
tests/conformance/istio-nftables pin the text, rule for rule.

Where Istio's nft mode writes rules nft refuses, this renderer writes rules that load and mean
what the iptables mode means: no jump to a chain that got no rules (DNS servers of a family the
pod does not have), names that nft would read as keywords are quoted, iptables' port ranges
(``8000:8010``) and interface wildcards (``eth+``) are written in nft's spelling (``8000-8010``,
``"eth*"``), and more included owner groups than one rule can hold become a set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from ..spec.errors import too_many_rules
from ..spec.limits import MAX_RULES
from ..spec.model import DNS_AGENT_PORT, OUTBOUND_MARK, InterceptionMode, RedirectSpec
from ..spec.values import Port, PortRange
from .ruleset import TproxyRoute

FAMILY = "inet"
DNS_PORT = 53
INBOUND_PASSTHROUGH_V4 = "127.0.0.6/32"
INBOUND_PASSTHROUGH_V6 = "::6/128"
LOOPBACK_V6 = "::1/128"
LOOPBACK_INTERFACE = "lo"

# A rule holds at most 128 expressions (the kernel's NFT_RULE_MAXEXPRS). Each `skgid != G` is
# two (a meta load and a compare), the counter and the verdict one each: up to 63 groups fit
# Istio's one-match-per-group form; more are matched as one set.
MAX_CHAINED_GROUPS = 63


class TableName(Enum):
    NAT = "istio-proxy-nat"
    MANGLE = "istio-proxy-mangle"
    RAW = "istio-proxy-raw"


class ChainType(Enum):
    NAT = "nat"
    FILTER = "filter"
    ROUTE = "route"


class Hook(Enum):
    PREROUTING = "prerouting"
    OUTPUT = "output"


class ChainName(Enum):
    PREROUTING = "prerouting"
    OUTPUT = "output"
    INBOUND = "istio-inbound"
    REDIRECT = "istio-redirect"
    IN_REDIRECT = "istio-in-redirect"
    OUTPUT_ISTIO = "istio-output"
    OUTPUT_DNS = "istio-output-dns"
    DIVERT = "istio-divert"
    TPROXY = "istio-tproxy"
    DROP = "istio-drop"


@dataclass(frozen=True, slots=True)
class BaseChain:
    """Where a base chain hooks into the stack (regular chains have none)."""

    type: ChainType
    hook: Hook
    priority: int


@dataclass(frozen=True, slots=True)
class Chain:
    name: ChainName
    base: BaseChain | None = None

    def declaration(self, table: TableName) -> str:
        head = f"add chain {FAMILY} {table.value} {self.name.value}"
        if self.base is None:
            return head
        base = self.base
        return f"{head} {{ type {base.type.value} hook {base.hook.value} priority {base.priority} ; }}"


# The chains each table may hold, in the order Istio declares them; a table creates only those
# that get rules. Priorities are the iptables tables' own: nat -100, mangle -150, raw -300.
TABLE_CHAINS: dict[TableName, tuple[Chain, ...]] = {
    TableName.NAT: (
        Chain(ChainName.PREROUTING, BaseChain(ChainType.NAT, Hook.PREROUTING, -100)),
        Chain(ChainName.OUTPUT, BaseChain(ChainType.NAT, Hook.OUTPUT, -100)),
        Chain(ChainName.INBOUND),
        Chain(ChainName.REDIRECT),
        Chain(ChainName.IN_REDIRECT),
        Chain(ChainName.OUTPUT_ISTIO),
        Chain(ChainName.OUTPUT_DNS),
    ),
    TableName.MANGLE: (
        Chain(ChainName.PREROUTING, BaseChain(ChainType.FILTER, Hook.PREROUTING, -150)),
        Chain(ChainName.OUTPUT, BaseChain(ChainType.ROUTE, Hook.OUTPUT, -150)),
        Chain(ChainName.DIVERT),
        Chain(ChainName.TPROXY),
        Chain(ChainName.INBOUND),
        Chain(ChainName.DROP),
    ),
    TableName.RAW: (
        Chain(ChainName.PREROUTING, BaseChain(ChainType.FILTER, Hook.PREROUTING, -300)),
        Chain(ChainName.OUTPUT, BaseChain(ChainType.FILTER, Hook.OUTPUT, -300)),
        Chain(ChainName.INBOUND),
        Chain(ChainName.OUTPUT_DNS),
    ),
}


# Words nft's scanner reads as keywords (nftables' src/scanner.l, all start conditions): an
# interface or group name spelled like one must be quoted, or nft refuses the rule (``iifname
# counter``) or reads another type (``iifname tcp``). Any other name is written bare, as Istio
# writes it; a keyword a later nft adds makes a bare name fail to load, never match otherwise.
_KEYWORD_WORDS = """
    eq ne le lt ge gt lshift rshift xor and or not vmap include define redefine undefine describe
    chains sets tables rules trace hook device devices table chain rule set element map flowtable
    handle ruleset socket transparent wildcard cgroupv2 level tproxy accept drop continue jump goto
    return to inet netdev add replace update create insert delete get list reset flush rename
    import export monitor destroy position index comment constant interval dynamic auto-merge
    timeout gc-interval elements expires policy size performance memory flow offload meter meters
    flowtables limits maps secmarks synproxys tunnel tunnels hooks counter name packets bytes last
    never counters quotas log prefix snaplen queue-threshold group queue num bypass fanout limit
    rate burst second minute week over quota until used hour day reject with icmpx snat dnat
    masquerade redirect random fully-random persistent port ll nh th bridge ether saddr daddr type
    typeof vlan id cfi dei pcp arp htype ptype hlen plen operation ip version hdrlength dscp ecn
    length frag-off ttl protocol checksum lsrr rr ssrr ra ptr value option options ackseq doff
    window urgptr echo eol maxseg mss nop noop sack sack0 sack1 sack2 sack3 sack-permitted
    sack-perm timestamp fastopen mptcp md5sig left right count tsval tsecr subtype time icmp icmpv6
    gateway code param-problem max-delay mtu taddr sequence igmp mrt ip6 priority flowlabel
    hoplimit nexthdr ah reserved spi esp comp cpi flags udp udplite csumcov sport dport vxlan vni
    geneve gre gretap tcp dccp sctp chunk vtag data init init-ack heartbeat heartbeat-ack abort
    shutdown shutdown-ack error cookie-echo cookie-ack ecne cwr shutdown-complete asconf-ack
    forward-tsn asconf tsn stream ssn ppid init-tag a-rwnd num-outbound-streams
    num-inbound-streams initial-tsn cum-tsn-ack num-gap-ack-blocks num-dup-tsns lowest-tsn seqno
    new-cum-tsn rt rt0 rt2 srh addr hbh frag reserved2 more-fragments dst mh meta mark iif iifname
    iiftype oif oifname oiftype skuid skgid nftrace rtclassid ibriport ibrname obriport obrname
    pkttype cpu iifgroup oifgroup cgroup nexthop seg-left last-entry tag sid classid ct avgpkt
    l3proto proto-src proto-dst zone original reply direction event expectation expiration helper
    helpers label state status numgen inc jhash symhash seed mod offset dup fwd fib check osf
    synproxy wscale tos notrack all xml json vm exists missing exthdr ipsec reqid spnum in out
    secmark xt l4proto nfproto
"""
NFT_KEYWORDS = frozenset(_KEYWORD_WORDS.split())


@dataclass(frozen=True, slots=True)
class Name:
    """An interface or group name (validated by the spec: letters, digits, ``_ . -``)."""

    value: str

    def text(self) -> str:
        if self.value.endswith("+"):
            # iptables' wildcard `eth+` is nft's `"eth*"` (quoted: a bare * is not a name).
            return f'"{self.value[:-1]}*"'
        return f'"{self.value}"' if self.value in NFT_KEYWORDS else self.value


def _port_text(port: Port) -> str:
    """A port, or a range in nft's spelling (``8000-8010``), whichever way it was written."""
    return f"{port.low}-{port.high}" if isinstance(port, PortRange) else str(port)


@dataclass(frozen=True, slots=True)
class PortSet:
    """An anonymous set of ports and ranges, ``{ 53, 15008 }``."""

    ports: tuple[Port, ...]

    def text(self) -> str:
        return "{ " + ", ".join(_port_text(p) for p in self.ports) + " }"


@dataclass(frozen=True, slots=True)
class NameSet:
    """An anonymous set of names or numbers, ``{ java, 202 }``."""

    names: tuple[Name, ...]

    def text(self) -> str:
        return "{ " + ", ".join(n.text() for n in self.names) + " }"


class Selector(Enum):
    """What a match reads, spelled as Istio spells it (``skuid`` and ``meta skuid`` are one key:
    Istio writes the long form in the raw table only)."""

    L4PROTO = "meta l4proto"
    TCP_DPORT = "tcp dport"
    UDP_DPORT = "udp dport"
    UDP_SPORT = "udp sport"
    IP_SADDR = "ip saddr"
    IP_DADDR = "ip daddr"
    IP6_SADDR = "ip6 saddr"
    IP6_DADDR = "ip6 daddr"
    IIFNAME = "iifname"
    OIFNAME = "oifname"
    SKUID = "skuid"
    SKGID = "skgid"
    META_SKUID = "meta skuid"
    META_SKGID = "meta skgid"
    MARK = "mark"
    CT_MARK = "ct mark"
    CT_STATE = "ct state"


class Protocol(Enum):
    TCP = "tcp"


class CtState(Enum):
    INVALID = "invalid"
    RELATED_ESTABLISHED = "related,established"


Value = int | str | PortRange | Name | PortSet | NameSet | Protocol | CtState


def _value_text(value: Value) -> str:
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, PortRange):
        return _port_text(value)
    if isinstance(value, Enum):
        return str(value.value)
    return value.text()


@dataclass(frozen=True, slots=True)
class Match:
    """``SELECTOR [!=] VALUE``."""

    selector: Selector
    value: Value
    negate: bool = False

    def text(self) -> str:
        op = " != " if self.negate else " "
        return f"{self.selector.value}{op}{_value_text(self.value)}"


@dataclass(frozen=True, slots=True)
class Counter:
    def text(self) -> str:
        return "counter"


class VerdictKind(Enum):
    RETURN = "return"
    ACCEPT = "accept"
    DROP = "drop"
    JUMP = "jump"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    chain: ChainName | None = None

    def text(self) -> str:
        return self.kind.value if self.chain is None else f"{self.kind.value} {self.chain.value}"


@dataclass(frozen=True, slots=True)
class Redirect:
    """NAT to a local port: ``redirect to :PORT``."""

    port: int

    def text(self) -> str:
        return f"redirect to :{self.port}"


@dataclass(frozen=True, slots=True)
class Tproxy:
    """``tproxy ip|ip6 to :PORT``: hand the packet to a local transparent socket."""

    family: Literal["ip", "ip6"]
    port: int

    def text(self) -> str:
        return f"tproxy {self.family} to :{self.port}"


@dataclass(frozen=True, slots=True)
class SetMark:
    """``meta mark set VALUE``, or the connection's mark when ``value`` is None."""

    value: int | None

    def text(self) -> str:
        return "meta mark set ct mark" if self.value is None else f"meta mark set {self.value}"


@dataclass(frozen=True, slots=True)
class SaveMark:
    """``ct mark set mark``: the packet's mark becomes the connection's."""

    def text(self) -> str:
        return "ct mark set mark"


@dataclass(frozen=True, slots=True)
class SetCtZone:
    zone: int

    def text(self) -> str:
        return f"ct zone set {self.zone}"


Statement = Match | Counter | Verdict | Redirect | Tproxy | SetMark | SaveMark | SetCtZone


@dataclass(frozen=True, slots=True)
class NftRule:
    """One rule: appended to its chain, or inserted before the rule at ``index`` (0-based)."""

    chain: ChainName
    statements: tuple[Statement, ...]
    index: int | None = None

    def text(self, table: TableName) -> str:
        body = " ".join(s.text() for s in self.statements)
        if self.index is None:
            return f"add rule {FAMILY} {table.value} {self.chain.value} {body}"
        return f"insert rule {FAMILY} {table.value} {self.chain.value} index {self.index} {body}"

    def jump_target(self) -> ChainName | None:
        for statement in self.statements:
            if isinstance(statement, Verdict) and statement.kind is VerdictKind.JUMP:
                return statement.chain
        return None


@dataclass(frozen=True, slots=True)
class NftTable:
    """One table: the chains it creates (those with rules, in declaration order) and its rules."""

    name: TableName
    chains: tuple[Chain, ...]
    rules: tuple[NftRule, ...]

    def lines(self) -> list[str]:
        """The table's part of the transaction: ensure it exists, empty it, rebuild it."""
        head = f"{FAMILY} {self.name.value}"
        out = [f"add table {head}", f"flush table {head}"]
        out += [chain.declaration(self.name) for chain in self.chains]
        out += [rule.text(self.name) for rule in self.rules]
        return out


@dataclass(frozen=True, slots=True)
class NftRuleset:
    """What one pod gets in nftables mode: the tables, plus what TPROXY and IPv6 need outside
    nftables (the same policy route and ``::6`` address as in iptables mode)."""

    tables: tuple[NftTable, ...]
    tproxy: TproxyRoute | None = None
    ipv6_passthrough_address: bool = False

    def text(self) -> str:
        """The ``nft -f`` transaction, as Istio's builder prints it; "" when there is nothing."""
        lines = [line for table in self.tables for line in table.lines()]
        return "\n".join(lines) + "\n" if lines else ""

    def to_json(self) -> dict[str, str]:
        return {"nftables": self.text()}

    def table(self, name: TableName) -> NftTable | None:
        return next((t for t in self.tables if t.name is name), None)

    def rule_count(self) -> int:
        return sum(len(t.rules) for t in self.tables)


@dataclass(slots=True)
class _Builder:
    """Accumulates each table's rules in order; IPv6-only rules are dropped when IPv6 is off."""

    ipv6: bool
    rules: dict[TableName, list[NftRule]] = field(default_factory=lambda: {t: [] for t in TableName})
    count: int = 0

    def add(self, table: TableName, chain: ChainName, *statements: Statement, v6: bool = False) -> None:
        if v6 and not self.ipv6:
            return
        self._counted()
        self.rules[table].append(NftRule(chain, statements))

    def insert(
        self, table: TableName, chain: ChainName, index: int, *statements: Statement, v6: bool = False
    ) -> None:
        if v6 and not self.ipv6:
            return
        self._counted()
        self.rules[table].append(NftRule(chain, statements, index))

    def _counted(self) -> None:
        self.count += 1
        if self.count > MAX_RULES:
            raise too_many_rules(MAX_RULES)


def _table(name: TableName, rules: list[NftRule]) -> NftTable | None:
    """The table as the transaction builds it: only chains with rules; an insert whose index is
    past the chain's end (or into an empty chain) appends, since nft refuses it otherwise."""
    if not rules:
        return None
    placed: list[NftRule] = []
    counts: dict[ChainName, int] = {}
    for rule in rules:
        count = counts.get(rule.chain, 0)
        if rule.index is not None and rule.index >= count:
            rule = NftRule(rule.chain, rule.statements)
        placed.append(rule)
        counts[rule.chain] = count + 1
    chains = tuple(c for c in TABLE_CHAINS[name] if c.name in counts)
    declared = {c.name for c in chains}
    for rule in placed:
        target = rule.jump_target()
        if target is not None and target not in declared:
            # The builder gates every jump on its target's rules; reaching this is a bug.
            raise AssertionError(f"{name.value}: jump to {target.value}, which has no rules")
    return NftTable(name, chains, tuple(placed))


# Short spellings for the statements every rule uses.
COUNTER = Counter()
RETURN = Verdict(VerdictKind.RETURN)
ACCEPT = Verdict(VerdictKind.ACCEPT)
TCP = Match(Selector.L4PROTO, Protocol.TCP)
LO_OUT = Match(Selector.OIFNAME, LOOPBACK_INTERFACE)
LO_IN = Match(Selector.IIFNAME, LOOPBACK_INTERFACE)


def _jump(chain: ChainName) -> Verdict:
    return Verdict(VerdictKind.JUMP, chain)


def render_nftables(spec: RedirectSpec) -> NftRuleset:
    """The ruleset ``istio-iptables --native-nftables`` writes for ``spec``, rule for rule."""
    b = _Builder(ipv6=spec.ipv6)
    nat, mangle = TableName.NAT, TableName.MANGLE
    c = ChainName
    tproxy = spec.mode is InterceptionMode.TPROXY
    loopback_v4 = str(spec.host_ipv4_loopback_cidr)
    dns = spec.dns_enabled

    # 1. Excluded interfaces: never captured, in either direction.
    for nic in spec.exclude_interfaces:
        b.add(nat, c.PREROUTING, Match(Selector.IIFNAME, Name(nic)), COUNTER, RETURN)
        b.add(nat, c.OUTPUT, Match(Selector.OIFNAME, Name(nic)), COUNTER, RETURN)
    if tproxy:
        for nic in spec.exclude_interfaces:
            b.add(mangle, c.PREROUTING, Match(Selector.IIFNAME, Name(nic)), COUNTER, RETURN)
            b.add(mangle, c.OUTPUT, Match(Selector.OIFNAME, Name(nic)), COUNTER, RETURN)

    # 2. Virtual interfaces: their inbound traffic is not treated as inbound.
    for nic in spec.reroute_virtual_interfaces:
        b.insert(nat, c.PREROUTING, 0, Match(Selector.IIFNAME, Name(nic)), COUNTER, RETURN)

    # 3. Drop conntrack-INVALID packets instead of letting them reset connections.
    if spec.drop_invalid:
        b.add(mangle, c.PREROUTING, TCP, Match(Selector.CT_STATE, CtState.INVALID), COUNTER, _jump(c.DROP))
        b.add(mangle, c.DROP, COUNTER, Verdict(VerdictKind.DROP))

    # 4. Regular chains every configuration has.
    b.add(nat, c.INBOUND, TCP, Match(Selector.TCP_DPORT, spec.inbound_tunnel_port), COUNTER, RETURN)
    b.add(nat, c.REDIRECT, TCP, COUNTER, Redirect(spec.proxy_port))
    b.add(nat, c.IN_REDIRECT, TCP, COUNTER, Redirect(spec.inbound_capture_port))

    # 5. Inbound.
    _inbound(b, spec, loopback_v4)

    # 6. Outbound: everything locally generated goes through istio-output.
    b.add(nat, c.OUTPUT, COUNTER, _jump(c.OUTPUT_ISTIO))
    for port in spec.outbound_ports_exclude:
        b.add(nat, c.OUTPUT_ISTIO, Match(Selector.TCP_DPORT, port), COUNTER, RETURN)
        b.add(nat, c.OUTPUT_ISTIO, Match(Selector.UDP_DPORT, port), COUNTER, RETURN)
    b.add(nat, c.OUTPUT_ISTIO, LO_OUT, Match(Selector.IP_SADDR, INBOUND_PASSTHROUGH_V4), COUNTER, RETURN)
    b.add(nat, c.OUTPUT_ISTIO, LO_OUT, Match(Selector.IP6_SADDR, INBOUND_PASSTHROUGH_V6), COUNTER, RETURN,
          v6=True)  # fmt: skip

    # 7. The proxy's own traffic, per UID then per GID.
    loopback_included = spec.outbound_cidrs.has_loopback
    tunnel = spec.inbound_tunnel_port
    owners = ((Selector.SKUID, spec.proxy_uids), (Selector.SKGID, spec.proxy_gids))
    for selector, ids in owners:
        for ident in ids:
            # With DNS capture the UIDs skip port 53 too: app -> agent DNS must not loop through
            # the inbound listener (Istio does it for UIDs only, in both modes).
            not_to: Value = PortSet((DNS_PORT, tunnel)) if dns and selector is Selector.SKUID else tunnel
            for family, local in ((Selector.IP_DADDR, loopback_v4), (Selector.IP6_DADDR, LOOPBACK_V6)):
                b.add(
                    nat, c.OUTPUT_ISTIO,
                    LO_OUT, TCP, Match(family, local, negate=True),
                    Match(Selector.TCP_DPORT, not_to, negate=True), Match(selector, ident),
                    COUNTER, _jump(c.IN_REDIRECT),
                    v6=family is Selector.IP6_DADDR,
                )  # fmt: skip
            if not loopback_included:
                if dns:
                    b.add(nat, c.OUTPUT_ISTIO, LO_OUT, TCP, Match(Selector.TCP_DPORT, DNS_PORT, negate=True),
                          Match(selector, ident, negate=True), COUNTER, RETURN)  # fmt: skip
                else:
                    b.add(nat, c.OUTPUT_ISTIO, LO_OUT, Match(selector, ident, negate=True), COUNTER, RETURN)
            b.add(nat, c.OUTPUT_ISTIO, Match(selector, ident), COUNTER, RETURN)

    # 8. Owner groups.
    groups = spec.owner_groups
    if groups.except_:
        for group in groups.values:
            b.add(nat, c.OUTPUT_ISTIO, Match(Selector.SKGID, Name(group)), COUNTER, RETURN)
    elif len(groups.values) > MAX_CHAINED_GROUPS:
        names = NameSet(tuple(Name(g) for g in groups.values))
        b.add(nat, c.OUTPUT_ISTIO, Match(Selector.SKGID, names, negate=True), COUNTER, RETURN)
    else:
        matches = (Match(Selector.SKGID, Name(g), negate=True) for g in groups.values)
        b.add(nat, c.OUTPUT_ISTIO, *matches, COUNTER, RETURN)

    # 9. DNS.
    if dns:
        _dns(b, spec)

    # 10. Local destinations, excluded and included ranges.
    b.add(nat, c.OUTPUT_ISTIO, Match(Selector.IP_DADDR, loopback_v4), COUNTER, RETURN)
    b.add(nat, c.OUTPUT_ISTIO, Match(Selector.IP6_DADDR, LOOPBACK_V6), COUNTER, RETURN, v6=True)
    for cidr in spec.outbound_cidrs_exclude:
        if cidr.version == 4:
            b.add(nat, c.OUTPUT_ISTIO, Match(Selector.IP_DADDR, str(cidr)), COUNTER, RETURN)
    for cidr in spec.outbound_cidrs_exclude:
        if cidr.version == 6:
            b.add(nat, c.OUTPUT_ISTIO, Match(Selector.IP6_DADDR, str(cidr)), COUNTER, RETURN, v6=True)
    for port in spec.outbound_ports_include:
        b.add(nat, c.OUTPUT_ISTIO, Match(Selector.TCP_DPORT, port), COUNTER, _jump(c.REDIRECT))
    _outbound_include(b, spec)

    if tproxy:
        _tproxy_marks(b, spec, loopback_v4)

    tables = (_table(name, b.rules[name]) for name in TableName)
    return NftRuleset(
        tables=tuple(t for t in tables if t is not None),
        # As istio-iptables: the policy route only when TPROXY captures some inbound port.
        tproxy=TproxyRoute(spec.tproxy_mark, spec.tproxy_route_table)
        if tproxy and not spec.inbound_ports.empty
        else None,
        ipv6_passthrough_address=spec.ipv6,
    )


def _inbound(b: _Builder, spec: RedirectSpec, loopback_v4: str) -> None:
    if spec.inbound_ports.empty:
        return
    c = ChainName
    exclude = spec.inbound_ports_exclude if spec.inbound_ports.wildcard else ()
    if spec.mode is not InterceptionMode.TPROXY:
        nat = TableName.NAT
        b.add(nat, c.PREROUTING, TCP, COUNTER, _jump(c.INBOUND))
        for port in exclude:
            b.add(nat, c.INBOUND, TCP, Match(Selector.TCP_DPORT, port), COUNTER, RETURN)
        if spec.inbound_ports.wildcard:
            b.add(nat, c.INBOUND, TCP, COUNTER, _jump(c.IN_REDIRECT))
        for port in spec.inbound_ports.ports:
            b.add(nat, c.INBOUND, TCP, Match(Selector.TCP_DPORT, port), COUNTER, _jump(c.IN_REDIRECT))
        return

    # TPROXY: new inbound connections go to the inbound listener as they are (istio-tproxy);
    # packets of established ones are marked so that the policy route delivers them locally.
    mangle = TableName.MANGLE
    mark = spec.tproxy_mark
    port = spec.inbound_capture_port
    b.add(mangle, c.DIVERT, COUNTER, SetMark(mark))
    b.add(mangle, c.DIVERT, COUNTER, ACCEPT)
    b.add(mangle, c.TPROXY, TCP, Match(Selector.IP_DADDR, loopback_v4, negate=True), Tproxy("ip", port),
          SetMark(mark), COUNTER, ACCEPT)  # fmt: skip
    b.add(mangle, c.TPROXY, TCP, Match(Selector.IP6_DADDR, LOOPBACK_V6, negate=True), Tproxy("ip6", port),
          SetMark(mark), COUNTER, ACCEPT, v6=True)  # fmt: skip
    b.add(mangle, c.PREROUTING, TCP, COUNTER, _jump(c.INBOUND))
    established = Match(Selector.CT_STATE, CtState.RELATED_ESTABLISHED)
    for excluded in exclude:
        b.add(mangle, c.INBOUND, TCP, Match(Selector.TCP_DPORT, excluded), COUNTER, RETURN)
    if spec.inbound_ports.wildcard:
        b.add(mangle, c.INBOUND, TCP, established, COUNTER, _jump(c.DIVERT))
        b.add(mangle, c.INBOUND, TCP, COUNTER, _jump(c.TPROXY))
    for included in spec.inbound_ports.ports:
        dport = Match(Selector.TCP_DPORT, included)
        b.add(mangle, c.INBOUND, TCP, established, dport, COUNTER, _jump(c.DIVERT))
        b.add(mangle, c.INBOUND, TCP, dport, COUNTER, _jump(c.TPROXY))


def _dns(b: _Builder, spec: RedirectSpec) -> None:
    nat, raw = TableName.NAT, TableName.RAW
    c = ChainName
    capture_all = spec.capture_all_dns
    v4 = spec.dns_servers_v4
    # Istio's nft mode keeps IPv6 servers in its conditions when IPv6 is off, and then jumps to
    # chains whose only rules were IPv6 ones (so never created): nft refuses the transaction.
    # Servers of a family the pod does not have are left out here, as the iptables mode does.
    v6 = spec.dns_servers_v6 if spec.ipv6 else ()
    b.add(raw, c.OUTPUT, COUNTER, _jump(c.OUTPUT_DNS))
    if capture_all or v4 or v6:
        b.add(nat, c.OUTPUT_ISTIO, COUNTER, _jump(c.OUTPUT_DNS))
    agent = Redirect(DNS_AGENT_PORT)
    tcp53 = Match(Selector.TCP_DPORT, DNS_PORT)
    udp53 = Match(Selector.UDP_DPORT, DNS_PORT)
    if capture_all:
        b.add(nat, c.OUTPUT_DNS, TCP, tcp53, COUNTER, agent)
        b.add(nat, c.OUTPUT_DNS, udp53, COUNTER, agent)
    else:
        for dport in (tcp53, udp53):
            for server in v4:
                to_server = Match(Selector.IP_DADDR, f"{server.text}/32")
                b.add(nat, c.OUTPUT_DNS, to_server, dport, COUNTER, agent)
            for server in v6:
                to_server = Match(Selector.IP6_DADDR, f"{server.text}/128")
                b.add(nat, c.OUTPUT_DNS, to_server, dport, COUNTER, agent)

    # Conntrack zones keep the proxy's upstream DNS flows apart from the app's.
    owners = ((Selector.META_SKUID, spec.proxy_uids), (Selector.META_SKGID, spec.proxy_gids))
    for selector, ids in owners:
        for ident in ids:
            b.add(raw, c.OUTPUT_DNS, udp53, Match(selector, ident), COUNTER, SetCtZone(1))
            b.add(raw, c.OUTPUT_DNS, Match(Selector.UDP_SPORT, DNS_AGENT_PORT), Match(selector, ident),
                  COUNTER, SetCtZone(2))  # fmt: skip
    from_dns = Match(Selector.UDP_SPORT, DNS_PORT)
    if capture_all:
        b.add(raw, c.PREROUTING, COUNTER, _jump(c.INBOUND))
        b.add(raw, c.OUTPUT_DNS, udp53, COUNTER, SetCtZone(2))
        b.add(raw, c.INBOUND, from_dns, COUNTER, SetCtZone(1))
        return
    if v4 or v6:
        b.add(raw, c.PREROUTING, COUNTER, _jump(c.INBOUND))
    servers: Iterable[tuple[Selector, Selector, str]] = (
        *((Selector.IP_DADDR, Selector.IP_SADDR, f"{s.text}/32") for s in v4),
        *((Selector.IP6_DADDR, Selector.IP6_SADDR, f"{s.text}/128") for s in v6),
    )
    for daddr, saddr, address in servers:
        b.add(raw, c.OUTPUT_DNS, udp53, Match(daddr, address), COUNTER, SetCtZone(2))
        b.add(raw, c.INBOUND, from_dns, Match(saddr, address), COUNTER, SetCtZone(1))


def _outbound_include(b: _Builder, spec: RedirectSpec) -> None:
    nat = TableName.NAT
    c = ChainName
    redirect = _jump(c.REDIRECT)
    selection = spec.outbound_cidrs
    if selection.wildcard:
        b.add(nat, c.OUTPUT_ISTIO, COUNTER, redirect)
        for nic in spec.reroute_virtual_interfaces:
            b.insert(nat, c.PREROUTING, 0, Match(Selector.IIFNAME, Name(nic)), COUNTER, redirect)
        return
    for version, selector in ((4, Selector.IP_DADDR), (6, Selector.IP6_DADDR)):
        for cidr in selection.of_version(version):
            daddr = Match(selector, str(cidr))
            for nic in spec.reroute_virtual_interfaces:
                b.insert(nat, c.PREROUTING, 0, Match(Selector.IIFNAME, Name(nic)), daddr, COUNTER, redirect,
                         v6=version == 6)  # fmt: skip
            b.add(nat, c.OUTPUT_ISTIO, daddr, COUNTER, redirect, v6=version == 6)


def _tproxy_marks(b: _Builder, spec: RedirectSpec, loopback_v4: str) -> None:
    mangle = TableName.MANGLE
    c = ChainName
    mark = spec.tproxy_mark
    marked = Match(Selector.MARK, mark)
    # The mark the original-source listener filter sets becomes the connection's.
    b.add(mangle, c.PREROUTING, TCP, marked, COUNTER, SaveMark())
    b.add(mangle, c.OUTPUT, LO_OUT, TCP, marked, COUNTER, RETURN)
    # The proxy's own loopback traffic to the pod IP (app -> VIP -> outbound -> inbound -> app).
    for selector, ids in ((Selector.SKUID, spec.proxy_uids), (Selector.SKGID, spec.proxy_gids)):
        for ident in ids:
            for family, local in ((Selector.IP_DADDR, loopback_v4), (Selector.IP6_DADDR, LOOPBACK_V6)):
                b.add(mangle, c.OUTPUT, LO_OUT, TCP, Match(family, local, negate=True),
                      Match(selector, ident), COUNTER, SetMark(OUTBOUND_MARK),
                      v6=family is Selector.IP6_DADDR)  # fmt: skip
    b.add(mangle, c.OUTPUT, TCP, Match(Selector.CT_MARK, mark), COUNTER, SetMark(None))
    # Never intercept again what is marked, what comes from the inbound passthrough address, or
    # the app's own loopback traffic to its pod IP.
    b.insert(mangle, c.INBOUND, 0, TCP, marked, COUNTER, RETURN)
    from_v4 = Match(Selector.IP_SADDR, INBOUND_PASSTHROUGH_V4)
    from_v6 = Match(Selector.IP6_SADDR, INBOUND_PASSTHROUGH_V6)
    b.insert(mangle, c.INBOUND, 1, LO_IN, TCP, from_v4, COUNTER, RETURN)
    b.insert(mangle, c.INBOUND, 1, LO_IN, TCP, from_v6, COUNTER, RETURN, v6=True)
    not_outbound = Match(Selector.MARK, OUTBOUND_MARK, negate=True)
    b.insert(mangle, c.INBOUND, 2, LO_IN, TCP, not_outbound, COUNTER, RETURN)
