"""Parsers for every scalar and list a redirect spec holds.

Each function takes the raw text of one flag or annotation and returns typed values, or raises
``SpecError`` naming that input. Nothing reaches the renderer except what these return, so a
newline, a shell metacharacter or an iptables option smuggled into a value is rejected here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from ..podfacts import MAX_ID
from .errors import SpecError, check_limit
from .limits import MAX_LIST_ITEMS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DIGITS = re.compile(r"[0-9]{1,10}")
_INTERFACE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]*")
# POSIX-portable user/group names (useradd's default rule), as iptables' owner match resolves them.
_GROUP_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ADDRESS_CHARS = re.compile(r"[0-9a-fA-F:.]+")
MAX_INTERFACE_LEN = 15
WILDCARD = "*"


def split_list(field: str, text: str, *, strip: str | None = None) -> list[str]:
    """Comma list as istio-iptables reads it: empty items dropped; items stripped of ``strip``
    (whitespace by default). At most MAX_LIST_ITEMS items."""
    items = [stripped for item in text.split(",") if (stripped := item.strip(strip))]
    check_limit(field, len(items), "items", MAX_LIST_ITEMS)
    return items


def parse_int(field: str, text: str, *, low: int, high: int, what: str) -> int:
    text = text.strip()
    if not _DIGITS.fullmatch(text):
        raise SpecError(field, text, f"{what} must be a whole number from {low} to {high}")
    number = int(text)
    if not low <= number <= high:
        raise SpecError(field, text, f"{what} must be from {low} to {high}")
    return number


def parse_port(field: str, text: str) -> int:
    return parse_int(field, text, low=1, high=65535, what="a port")


def parse_ports(field: str, text: str) -> tuple[int, ...]:
    """A comma list of ports, duplicates removed (first occurrence kept)."""
    seen: dict[int, None] = {}
    for item in split_list(field, text):
        seen.setdefault(parse_port(field, item), None)
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class PortSelection:
    """``*`` (every port), an explicit list, or nothing."""

    wildcard: bool = False
    ports: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.wildcard and not self.ports


def parse_port_selection(field: str, text: str) -> PortSelection:
    if text.strip() == WILDCARD:
        return PortSelection(wildcard=True)
    if WILDCARD in text:
        raise SpecError(field, text, "'*' stands alone: it cannot be mixed with ports")
    return PortSelection(ports=parse_ports(field, text))


def parse_ports_no_wildcard(field: str, text: str) -> tuple[int, ...]:
    if WILDCARD in text:
        raise SpecError(field, text, "'*' is not allowed here: list the ports")
    return parse_ports(field, text)


@dataclass(frozen=True, slots=True)
class Cidr:
    """An IPv4 or IPv6 network as written (``127.0.0.1/24`` keeps its host bits, as Istio's
    rules do); rendered in canonical form."""

    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface

    @property
    def version(self) -> Literal[4, 6]:
        return 4 if isinstance(self.interface, ipaddress.IPv4Interface) else 6

    @property
    def is_loopback(self) -> bool:
        return self.interface.ip.is_loopback

    def __str__(self) -> str:
        return f"{self.interface.ip}/{self.interface.network.prefixlen}"


def parse_cidr(field: str, text: str) -> Cidr:
    text = text.strip()
    address, slash, prefix = text.partition("/")
    if not slash or not _ADDRESS_CHARS.fullmatch(address) or not _DIGITS.fullmatch(prefix):
        raise SpecError(field, text, "not a CIDR (expected ADDRESS/PREFIX, e.g. 10.0.0.0/8)")
    try:
        return Cidr(ipaddress.ip_interface(text))
    except ValueError as exc:
        raise SpecError(field, text, f"not a CIDR: {exc}") from None


def parse_cidrs(field: str, text: str) -> tuple[Cidr, ...]:
    if WILDCARD in text:
        raise SpecError(field, text, "'*' is not allowed here: list the CIDRs")
    seen: dict[Cidr, None] = {}
    for item in split_list(field, text):
        seen.setdefault(parse_cidr(field, item), None)
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class CidrSelection:
    """``*`` (every destination), an explicit list, or nothing."""

    wildcard: bool = False
    cidrs: tuple[Cidr, ...] = ()

    def of_version(self, version: int) -> tuple[Cidr, ...]:
        return tuple(c for c in self.cidrs if c.version == version)

    @property
    def has_loopback(self) -> bool:
        return any(c.is_loopback for c in self.cidrs)


def parse_cidr_selection(field: str, text: str) -> CidrSelection:
    if text.strip() == WILDCARD:
        return CidrSelection(wildcard=True)
    return CidrSelection(cidrs=parse_cidrs(field, text))


def parse_interfaces(field: str, text: str) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for name in split_list(field, text, strip=" "):
        if len(name) > MAX_INTERFACE_LEN:
            raise SpecError(field, name, f"an interface name has at most {MAX_INTERFACE_LEN} characters")
        if not _INTERFACE.fullmatch(name):
            raise SpecError(
                field, name, "an interface name starts with a letter and holds only letters, digits, _ . -"
            )
        names.setdefault(name, None)
    return tuple(names)


def parse_ids(field: str, text: str, *, what: str) -> tuple[int, ...]:
    ids: dict[int, None] = {}
    for item in split_list(field, text):
        ids.setdefault(parse_int(field, item, low=0, high=MAX_ID, what=what), None)
    if not ids:
        raise SpecError(field, text, f"at least one {what} is needed")
    return tuple(ids)


def parse_groups(field: str, text: str) -> tuple[str, ...]:
    """Owner groups: numeric GIDs or POSIX group names (numbers are preferred: names resolve
    in the node agent's /etc/group, not the pod's)."""
    groups: dict[str, None] = {}
    for item in split_list(field, text):
        if _DIGITS.fullmatch(item):
            groups.setdefault(str(parse_int(field, item, low=0, high=MAX_ID, what="a GID")), None)
        elif _GROUP_NAME.fullmatch(item):
            groups.setdefault(item, None)
        else:
            raise SpecError(field, item, "a group is a GID or a name like 'java' (lower case, digits, _ -)")
    return tuple(groups)


@dataclass(frozen=True, slots=True)
class DnsServer:
    """A DNS server address; ``text`` keeps the address as written (validated) so rules read
    as istio-iptables writes them (``::127.0.0.53``)."""

    address: IPAddress
    text: str

    @property
    def version(self) -> Literal[4, 6]:
        return 4 if isinstance(self.address, ipaddress.IPv4Address) else 6


def parse_dns_servers(field: str, text: str, *, version: Literal[4, 6]) -> tuple[DnsServer, ...]:
    servers: dict[DnsServer, None] = {}
    for item in split_list(field, text):
        if not _ADDRESS_CHARS.fullmatch(item):
            raise SpecError(field, item, "not an IP address")
        try:
            address = ipaddress.ip_address(item)
        except ValueError as exc:
            raise SpecError(field, item, f"not an IP address: {exc}") from None
        if address.version != version:
            raise SpecError(field, item, f"not an IPv{version} address")
        servers.setdefault(DnsServer(address, item), None)
    return tuple(servers)


def parse_bool(field: str, text: str) -> bool:
    """Booleans as Go's strconv.ParseBool reads them (the proxy's env values)."""
    value = text.strip()
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise SpecError(field, text, "expected true or false")
