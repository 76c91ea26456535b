"""The redirect spec: every option of one pod's traffic interception, validated and immutable.

This is the single input of the renderer. It is built by ``spec.flags`` (istio-iptables flags,
as istio-init receives them) or ``spec.pod`` (a pod manifest, with Istio CNI's semantics), and
its invariants are checked in ``__post_init__`` so that no builder can produce an invalid one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import SpecError, check_limit
from .limits import MAX_OWNER_GROUPS_INCLUDE
from .values import NO_PORTS, Cidr, CidrSelection, DnsServer, Port, PortRange, Ports, PortSelection

DEFAULT_PROXY_PORT = 15001
DEFAULT_INBOUND_CAPTURE_PORT = 15006
DEFAULT_INBOUND_TUNNEL_PORT = 15008
DEFAULT_PROXY_UID = 1337
DEFAULT_TPROXY_MARK = 1337
DEFAULT_TPROXY_ROUTE_TABLE = 133
DNS_AGENT_PORT = 15053
OUTBOUND_MARK = 1338  # istio-iptables' mark for proxy -> workload traffic in TPROXY mode
DEFAULT_LOOPBACK_CIDR = Cidr(ipaddress.IPv4Interface("127.0.0.1/32"))
# Route tables the kernel reserves (unspec, default, main, local): TPROXY's local default route
# in one of them takes over the pod's routing (istio-iptables writes it into main for 254).
RESERVED_ROUTE_TABLES = frozenset({0, 253, 254, 255})
MAX_MARK = 2**32 - 1


class InterceptionMode(Enum):
    REDIRECT = "REDIRECT"
    TPROXY = "TPROXY"


@dataclass(frozen=True, slots=True)
class OwnerGroups:
    """Which groups' outbound traffic is captured: all but ``values`` (``except_=True``, the
    default with no values), or only ``values``."""

    except_: bool = True
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RedirectSpec:
    proxy_port: int = DEFAULT_PROXY_PORT
    inbound_capture_port: int = DEFAULT_INBOUND_CAPTURE_PORT
    inbound_tunnel_port: Port = DEFAULT_INBOUND_TUNNEL_PORT
    proxy_uids: tuple[int, ...] = (DEFAULT_PROXY_UID,)
    proxy_gids: tuple[int, ...] = (DEFAULT_PROXY_UID,)
    mode: InterceptionMode = InterceptionMode.REDIRECT
    inbound_ports: PortSelection = field(default_factory=PortSelection)
    inbound_ports_exclude: Ports = NO_PORTS
    outbound_cidrs: CidrSelection = field(default_factory=CidrSelection)
    outbound_cidrs_exclude: tuple[Cidr, ...] = ()
    outbound_ports_include: Ports = NO_PORTS
    outbound_ports_exclude: Ports = NO_PORTS
    reroute_virtual_interfaces: tuple[str, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    tproxy_mark: int = DEFAULT_TPROXY_MARK
    tproxy_route_table: int = DEFAULT_TPROXY_ROUTE_TABLE
    redirect_dns: bool = False
    capture_all_dns: bool = False
    drop_invalid: bool = False
    ipv6: bool = False
    dns_servers_v4: tuple[DnsServer, ...] = ()
    dns_servers_v6: tuple[DnsServer, ...] = ()
    owner_groups: OwnerGroups = field(default_factory=OwnerGroups)
    host_ipv4_loopback_cidr: Cidr = DEFAULT_LOOPBACK_CIDR

    def __post_init__(self) -> None:
        loop = self.host_ipv4_loopback_cidr
        if loop.version != 4 or not loop.is_loopback or loop.interface.network.prefixlen < 8:
            raise SpecError(
                "--host-ipv4-loopback-cidr", str(loop), "must be an IPv4 CIDR inside 127.0.0.0/8, prefix 8-32"
            )
        if not 0 <= self.tproxy_mark <= MAX_MARK:
            raise SpecError("-t", self.tproxy_mark, f"a mark is from 0 to {MAX_MARK}")
        if not 0 <= self.tproxy_route_table <= MAX_MARK:
            raise SpecError("-r", self.tproxy_route_table, f"a route table is from 0 to {MAX_MARK}")
        if self.mode is InterceptionMode.TPROXY:
            # Only TPROXY uses the mark and the table (istio-iptables ignores both otherwise).
            if self.tproxy_mark in (0, OUTBOUND_MARK):
                raise SpecError(
                    "-t",
                    self.tproxy_mark,
                    f"TPROXY needs a mark other than 0 and {OUTBOUND_MARK}, the proxy's outbound mark",
                )
            if self.tproxy_route_table in RESERVED_ROUTE_TABLES:
                raise SpecError(
                    "-r",
                    self.tproxy_route_table,
                    "TPROXY's local default route would take over a table the kernel reserves "
                    "(0, 253 default, 254 main, 255 local)",
                )
        if not self.owner_groups.except_:
            check_limit(
                "--owner-groups-include", len(self.owner_groups.values), "groups", MAX_OWNER_GROUPS_INCLUDE
            )
        if not self.proxy_uids or not self.proxy_gids:
            raise SpecError("-u", "", "at least one proxy UID and GID is needed")

    @property
    def dns_enabled(self) -> bool:
        """istio-iptables turns DNS capture off when it has neither servers nor capture-all."""
        return self.redirect_dns and (
            self.capture_all_dns or bool(self.dns_servers_v4) or bool(self.dns_servers_v6)
        )

    def to_json(self) -> dict[str, Any]:
        """A plain-JSON view of every option (for `rules --output json`)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            out[name] = _plain(getattr(self, name))
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Cidr):
        return str(value)
    if isinstance(value, DnsServer):
        return value.text
    if isinstance(value, PortRange):
        return str(value)
    if isinstance(value, PortSelection):
        return "*" if value.wildcard else [_plain(p) for p in value.ports]
    if isinstance(value, CidrSelection):
        return "*" if value.wildcard else [str(c) for c in value.cidrs]
    if isinstance(value, OwnerGroups):
        return {"except": value.except_, "groups": list(value.values)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
