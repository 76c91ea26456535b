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
# A number as every consumer of istio-iptables' text reads it alike: decimal, no leading zero.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,9}")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_SERVICE_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]*")
# A name, or a name ending in "+": iptables' interface wildcard (every name with that prefix).
_INTERFACE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]*\+?")
# POSIX-portable user/group names (useradd's default rule), as iptables' owner match resolves them.
_GROUP_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ADDRESS_CHARS = re.compile(r"[0-9a-fA-F:.]+")
MAX_INTERFACE_LEN = 15
WILDCARD = "*"


def split_list(field: str, text: str) -> list[str]:
    """Comma list as istio-iptables reads it: empty items dropped, every other item kept as
    written and in order, repeats included (istio-iptables writes one rule per item). A blank
    item is an error: istio-iptables writes a rule without its value, which iptables and nft
    refuse. At most MAX_LIST_ITEMS items."""
    items = [item for item in text.split(",") if item]
    check_limit(field, len(items), "items", MAX_LIST_ITEMS)
    for item in items:
        if not item.strip():
            raise SpecError(field, text, "a blank item in the list (istio-iptables refuses it too)")
    return items


def _number_problem(text: str, what: str, low: int, high: int) -> str:
    """Why ``text`` is not one of our numbers, in words that say what to write instead."""
    if not text:
        return f"{what} is missing (istio-iptables refuses an empty value too)"
    if _HEX.fullmatch(text):
        return f"{what} is written in decimal here (hexadecimal is refused)"
    if _DIGITS.fullmatch(text):
        return (
            f"{what} is written without leading zeros: istio-iptables passes the text on, and "
            "iptables and nft read it as octal (010 is 8) while its own route code reads decimal"
        )
    if _SERVICE_NAME.fullmatch(text) and what == "a port":
        return (
            "service names are refused: they resolve against whichever /etc/services the program "
            "that writes the rules sees; write the port number"
        )
    return f"{what} must be a whole number from {low} to {high}"


def parse_int(field: str, text: str, *, low: int, high: int, what: str) -> int:
    """A decimal number from ``low`` to ``high``; surrounding whitespace is allowed (iptables
    and nft read the value as a token of its own)."""
    stripped = text.strip()
    if not _DECIMAL.fullmatch(stripped):
        raise SpecError(field, text, _number_problem(stripped, what, low, high))
    number = int(stripped)
    if not low <= number <= high:
        raise SpecError(field, text, f"{what} must be from {low} to {high}")
    return number


MAX_PORT = 65535
RangeSeparator = Literal[":", "-"]


@dataclass(frozen=True, slots=True)
class PortRange:
    """A range of ports, ``low`` to ``high`` included, spelled as written: ``8000:8010`` is
    iptables' form (``:8010`` and ``8000:`` leave an end open), ``8000-8010`` nft's. Each of
    Istio's modes takes only its own spelling; ``render`` refuses the other one where Istio does
    and nothing is lost (``str`` gives the text back)."""

    low: int
    high: int
    separator: RangeSeparator = ":"
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.low}{self.separator}{self.high}"

    def covers(self, port: int) -> bool:
        return self.low <= port <= self.high


Port = int | PortRange


class Ports(tuple[Port, ...]):
    """A list of ports and ranges, in order; ``port in ports`` says whether some item covers it."""

    __slots__ = ()

    def __contains__(self, port: object) -> bool:
        for item in tuple.__iter__(self):
            if item == port or (isinstance(item, PortRange) and isinstance(port, int) and item.covers(port)):
                return True
        return False


NO_PORTS = Ports()


def parse_port(field: str, text: str) -> int:
    """One port number, 0 to 65535 (0 is taken as istio-iptables takes it)."""
    return parse_int(field, text, low=0, high=MAX_PORT, what="a port")


def parse_port_or_range(field: str, text: str) -> Port:
    """A port, or a range as iptables (``8000:8010``, ``:8010``, ``8000:``) or nft
    (``8000-8010``) writes it."""
    stripped = text.strip()
    separator: RangeSeparator | None = ":" if ":" in stripped else "-" if "-" in stripped else None
    if separator is None:
        return parse_port(field, text)
    low_text, _, high_text = stripped.partition(separator)
    if separator == "-" and not (low_text and high_text):
        raise SpecError(field, text, "an nft port range has both ends (8000-8010)")
    low = parse_port(field, low_text) if low_text else 0
    high = parse_port(field, high_text) if high_text else MAX_PORT
    if low > high:
        raise SpecError(field, text, "a port range runs from the lower port to the higher")
    return PortRange(low, high, separator, stripped)


def parse_ports(field: str, text: str) -> Ports:
    """A comma list of ports and port ranges, in order, repeats kept."""
    return Ports(parse_port_or_range(field, item) for item in split_list(field, text))


@dataclass(frozen=True, slots=True)
class PortSelection:
    """``*`` (every port), an explicit list, or nothing."""

    wildcard: bool = False
    ports: Ports = NO_PORTS

    @property
    def empty(self) -> bool:
        return not self.wildcard and not self.ports


def parse_port_selection(field: str, text: str) -> PortSelection:
    # Exactly "*", as istio-iptables compares it: " *" would be a port to it.
    if text == WILDCARD:
        return PortSelection(wildcard=True)
    if WILDCARD in text:
        raise SpecError(field, text, "'*' stands alone, without spaces or ports")
    return PortSelection(ports=parse_ports(field, text))


def parse_ports_no_wildcard(field: str, text: str) -> Ports:
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
        """Loopback as Go's netip reads it: an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``)
        is unmapped first, so istio-iptables treats such a range as loopback."""
        ip = self.interface.ip
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)

    def __str__(self) -> str:
        return f"{self.interface.ip}/{self.interface.network.prefixlen}"


def parse_cidr(field: str, text: str) -> Cidr:
    """ADDRESS/PREFIX as Go's netip.ParsePrefix takes it: no spaces, no leading zero in the
    prefix length (istio-iptables refuses both)."""
    address, slash, prefix = text.partition("/")
    if not slash or not _ADDRESS_CHARS.fullmatch(address) or not _DIGITS.fullmatch(prefix):
        raise SpecError(field, text, "not a CIDR (expected ADDRESS/PREFIX without spaces, e.g. 10.0.0.0/8)")
    if not _DECIMAL.fullmatch(prefix):
        raise SpecError(field, text, "a prefix length is written without leading zeros")
    try:
        return Cidr(ipaddress.ip_interface(text))
    except ValueError as exc:
        raise SpecError(field, text, f"not a CIDR: {exc}") from None


def parse_cidrs(field: str, text: str) -> tuple[Cidr, ...]:
    """A comma list of CIDRs, in order, repeats kept."""
    if WILDCARD in text:
        raise SpecError(field, text, "'*' is not allowed here: list the CIDRs")
    return tuple(parse_cidr(field, item) for item in split_list(field, text))


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
    if text == WILDCARD:
        return CidrSelection(wildcard=True)
    return CidrSelection(cidrs=parse_cidrs(field, text))


def parse_interfaces(field: str, text: str) -> tuple[str, ...]:
    """Interface names, in order, repeats kept; ``eth+`` is every interface whose name starts
    with ``eth`` (iptables' wildcard; the nft renderer writes it as nft's ``"eth*"``)."""
    names: list[str] = []
    for item in split_list(field, text):
        name = item.strip()
        if len(name) > MAX_INTERFACE_LEN:
            raise SpecError(field, name, f"an interface name has at most {MAX_INTERFACE_LEN} characters")
        if not _INTERFACE.fullmatch(name):
            raise SpecError(
                field,
                name,
                "an interface name starts with a letter and holds only letters, digits, _ . - "
                "(and a '+' at the end, for all names that start so)",
            )
        names.append(name)
    return tuple(names)


def parse_ids(field: str, text: str, *, what: str) -> tuple[int, ...]:
    """UIDs or GIDs, in order, repeats kept."""
    ids = tuple(parse_int(field, item, low=0, high=MAX_ID, what=what) for item in split_list(field, text))
    if not ids:
        raise SpecError(field, text, f"at least one {what} is needed")
    return ids


def parse_groups(field: str, text: str) -> tuple[str, ...]:
    """Owner groups: numeric GIDs or POSIX group names (numbers are preferred: names resolve
    in the node agent's /etc/group, not the pod's), in order, repeats kept."""
    groups: list[str] = []
    for item in split_list(field, text):
        group = item.strip()
        if _DIGITS.fullmatch(group):
            groups.append(str(parse_int(field, group, low=0, high=MAX_ID, what="a GID")))
        elif _GROUP_NAME.fullmatch(group):
            groups.append(group)
        else:
            raise SpecError(field, group, "a group is a GID or a name like 'java' (lower case, digits, _ -)")
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
    """DNS server addresses, in order, repeats kept (istio-iptables reads them from the pod's
    resolv.conf, one rule per nameserver line)."""
    servers: list[DnsServer] = []
    for raw in split_list(field, text):
        item = raw.strip()
        if not _ADDRESS_CHARS.fullmatch(item):
            raise SpecError(field, item, "not an IP address")
        try:
            address = ipaddress.ip_address(item)
        except ValueError as exc:
            raise SpecError(field, item, f"not an IP address: {exc}") from None
        if address.version != version:
            raise SpecError(field, item, f"not an IPv{version} address")
        servers.append(DnsServer(address, item))
    return tuple(servers)


def parse_bool(field: str, text: str) -> bool:
    """Booleans as Go's strconv.ParseBool reads them (the proxy's env values)."""
    value = text.strip()
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise SpecError(field, text, "expected true or false")
