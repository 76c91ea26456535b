"""Where our rules and Istio's istio-iptables part on purpose, or meet where one could expect them
to part: one list, the one place the peer tier takes its allowed differences from.

docs/configuration.md's table "Differences from istio-iptables" has one row per entry here (a
test holds the two together). Each entry says, per mode, whether Istio's binary and ours accept
a minimal configuration showing the class (``example``, flags beyond the peer tier's base), and
``shown`` says which classes a generated configuration shows. Where the entry says ours and
Istio's differ in a mode, the property test expects our outcome as written here and does not
compare with Istio's; everywhere else it expects the same outcome and, when both accept, the
same kernel state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from istio_pod_network_controller.render.nftables import NFT_KEYWORDS
from istio_pod_network_controller.spec import SpecError
from istio_pod_network_controller.spec import values as v
from istio_pod_network_controller.spec.limits import MAX_LIST_ITEMS, MAX_RULES


class Mode(Enum):
    IPTABLES = "iptables"
    NFT = "nft"


ACCEPTS, REFUSES = True, False


@dataclass(frozen=True)
class Difference:
    id: str
    example: tuple[str, ...]
    istio: dict[Mode, bool]  # whether istio-iptables accepts the example, per mode
    ours: dict[Mode, bool]
    same_state: bool = True  # when both accept: whether they leave the same kernel state

    def differs(self, mode: Mode) -> bool:
        return self.istio[mode] != self.ours[mode] or not self.same_state


def both(
    istio_iptables: bool, istio_nft: bool, ours_iptables: bool, ours_nft: bool
) -> tuple[dict[Mode, bool], ...]:
    return (
        {Mode.IPTABLES: istio_iptables, Mode.NFT: istio_nft},
        {Mode.IPTABLES: ours_iptables, Mode.NFT: ours_nft},
    )


def _entry(
    id: str, example: tuple[str, ...], outcomes: tuple[dict[Mode, bool], ...], *, same_state: bool = True
) -> Difference:
    return Difference(id, example, outcomes[0], outcomes[1], same_state)


_GROUPS_64 = ",".join(str(1000 + i) for i in range(64))
_PORTS_1001 = ",".join(str(1000 + i) for i in range(MAX_LIST_ITEMS + 1))
_GROUPS_50 = ",".join(str(1000 + i) for i in range(50))
# 1,000 CIDRs times 21 virtual interfaces: a rule per pair, past MAX_RULES.
_CIDRS_1000 = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(1000))
_NICS_21 = ",".join(f"kv{i}" for i in range(21))

DIFFERENCES: tuple[Difference, ...] = (
    # Parity: listed because one could expect a difference.
    _entry("tproxy-no-inbound-ports", ("-m", "TPROXY", "-b", ""), both(ACCEPTS, ACCEPTS, ACCEPTS, ACCEPTS)),
    _entry("repeated-items", ("-b", "80,80", "-o", "15020,15020", "-c", "eth1,eth1"), both(*[ACCEPTS] * 4)),
    _entry("ipv4-mapped-loopback", ("-i", "::ffff:127.0.0.1/128", "--ipv6"), both(*[ACCEPTS] * 4)),
    _entry("port-zero", ("-b", "0", "-p", "0"), both(*[ACCEPTS] * 4)),
    _entry(
        "owner-groups-both-lists",
        ("--owner-groups-include", "1000", "--owner-groups-exclude", "1001"),
        both(*[ACCEPTS] * 4),
    ),
    _entry(
        "ignored-flags",
        ("--log_output_level=default:debug", "--reconcile", "--probe-timeout", "1s"),
        both(*[ACCEPTS] * 4),
    ),
    _entry("empty-value", ("-p", ""), both(*[REFUSES] * 4)),
    _entry("blank-item", ("-b", " "), both(*[REFUSES] * 4)),
    _entry("cidr-spelling", ("-i", "10.0.0.0/08"), both(*[REFUSES] * 4)),
    _entry("port-range-reversed", ("-b", "8010:8000"), both(*[REFUSES] * 4)),
    _entry("port-range-dash", ("-b", "8000-8010"), both(REFUSES, ACCEPTS, REFUSES, ACCEPTS)),
    _entry(
        "owner-groups-50-to-63",
        ("--owner-groups-include", _GROUPS_50),
        both(REFUSES, ACCEPTS, REFUSES, ACCEPTS),
    ),
    # Differences.
    _entry("leading-zeros", ("-b", "010"), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry("hex-numbers", ("-b", "0x50"), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry("service-names", ("-b", "http"), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry("port-range-colon", ("-b", "8000:8010"), both(ACCEPTS, REFUSES, ACCEPTS, ACCEPTS)),
    _entry("interface-wildcard", ("-c", "eth+"), both(ACCEPTS, REFUSES, ACCEPTS, ACCEPTS)),
    _entry("interface-plus-inside", ("-c", "e+th"), both(ACCEPTS, REFUSES, REFUSES, REFUSES)),
    _entry("nft-keyword-interface", ("-c", "counter"), both(ACCEPTS, REFUSES, ACCEPTS, ACCEPTS)),
    _entry(
        "interception-mode-spelling", ("-m", "tproxy", "-b", "80"), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)
    ),
    _entry(
        "tproxy-mark-reserved",
        ("-m", "TPROXY", "-b", "80", "-t", "1338"),
        both(ACCEPTS, ACCEPTS, REFUSES, REFUSES),
    ),
    _entry(
        "tproxy-table-reserved",
        ("-m", "TPROXY", "-b", "80", "-r", "254"),
        both(ACCEPTS, ACCEPTS, REFUSES, REFUSES),
    ),
    _entry("checked-though-unused", ("-b", "80", "-d", " "), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry("empty-id-list", ("-u", ","), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry("user-names", ("-u", "root"), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry("run-control-flags", ("--skip-rule-apply",), both(*[ACCEPTS] * 4), same_state=False),
    _entry("envoy-user", ("-u", "", "ENVOY_USER=daemon"), both(*[ACCEPTS] * 4), same_state=False),
    _entry("list-over-limit", ("-o", _PORTS_1001), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry("rules-over-limit", ("-i", _CIDRS_1000, "-k", _NICS_21), both(ACCEPTS, ACCEPTS, REFUSES, REFUSES)),
    _entry(
        "owner-groups-64", ("--owner-groups-include", _GROUPS_64), both(REFUSES, REFUSES, REFUSES, ACCEPTS)
    ),
    _entry(
        "dns-ipv6-servers-on-ipv4-pod",
        ("--redirect-dns", "--dns-servers-v6", "fd00::10"),
        both(ACCEPTS, REFUSES, ACCEPTS, ACCEPTS),
    ),
)
BY_ID: dict[str, Difference] = {d.id: d for d in DIFFERENCES}


# What a generated configuration shows. A configuration is istio-iptables' options by short flag
# (``-b``...; ``--owner-groups-include`` and the other env-only settings under their flag names;
# ``ENVOY_USER`` under its own), the switches that are on, and whether the pod has IPv6.
Options = Mapping[str, str]

PORT_LISTS = ("-b", "-d", "-q", "-o")
# Flags of istio-iptables that change what the process does, not which rules: with them it
# writes nothing (or only removes); ours programs the pod all the same. (Its nft mode writes the
# rules despite --dry-run, but not the policy route and address.)
RUN_CONTROL_FLAGS = ("--dry-run", "-n", "--skip-rule-apply", "--cleanup-only")
_LEADING_ZERO = re.compile(r"0[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]*")


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item]


def _not_a_number(text: str) -> bool:
    return _refused(lambda: v.parse_int("-t", text, low=0, high=2**32 - 1, what="a number"))


def _refused(parse: Callable[[], object]) -> bool:
    try:
        parse()
    except SpecError:
        return True
    return False


PORT_FLAGS = ("-p", "-z", "-e", *PORT_LISTS)
ID_FLAGS = ("-u", "-g")
NUMBER_FLAGS = (*PORT_FLAGS, *ID_FLAGS, "-t", "-r")


def _number_parts(options: Options, flags: tuple[str, ...]) -> list[str]:
    """The text of every number of ``flags``, list items and range ends included."""
    parts: list[str] = []
    for flag in flags:
        for item in _items(options.get(flag, "")):
            parts += [p for p in re.split(r"[:-]", item) if p] if flag in (*PORT_LISTS, "-e") else [item]
    return parts


def _used_ports(options: Options) -> list[str]:
    """Port list items istio-iptables writes into a rule: -d only beside -b '*'."""
    inbound = options.get("-b", "")
    used = [] if inbound == "*" else _items(inbound)
    if inbound == "*":
        used += _items(options.get("-d", ""))
    for flag in ("-q", "-o", "-e"):
        used += _items(options.get(flag, ""))
    return used


def _interfaces(options: Options) -> list[str]:
    return _items(options.get("-c", "")) + _items(options.get("-k", ""))


def shown(options: Options, switches: frozenset[str], *, ipv6: bool, mode: Mode) -> set[str]:
    """The ids of the differences that apply to this configuration in ``mode`` (parity entries
    included, so a caller can tell what was covered)."""
    found: set[str] = set()
    if switches & set(RUN_CONTROL_FLAGS):
        found.add("run-control-flags")
    if "ENVOY_USER" in options and options.get("-u", "") == "":
        found.add("envoy-user")
    if any(len([i for i in text.split(",") if i]) > MAX_LIST_ITEMS for text in options.values()):
        found.add("list-over-limit")
    elif len(_items(options.get("-k", ""))) * len(_items(options.get("-i", ""))) > MAX_RULES:
        found.add("rules-over-limit")
    parts = _number_parts(options, NUMBER_FLAGS)
    if any(_LEADING_ZERO.fullmatch(p) for p in parts):
        found.add("leading-zeros")
    if any(_HEX.fullmatch(p) for p in parts):
        found.add("hex-numbers")
    if any(_NAME.fullmatch(p) for p in _number_parts(options, PORT_FLAGS)):
        found.add("service-names")
    if any(_NAME.fullmatch(p) for p in _number_parts(options, ID_FLAGS)):
        found.add("user-names")
    used = _used_ports(options)
    if mode is Mode.NFT and any(":" in item for item in used):
        found.add("port-range-colon")
    if any(re.fullmatch(r"\s*[0-9]+-[0-9]+\s*", item) for item in used):
        found.add("port-range-dash")
    interfaces = _interfaces(options)
    if mode is Mode.NFT and any(name.endswith("+") for name in interfaces):
        found.add("interface-wildcard")
    if any("+" in name[:-1] for name in interfaces):
        found.add("interface-plus-inside")
    if mode is Mode.NFT and any(name in NFT_KEYWORDS for name in interfaces):
        found.add("nft-keyword-interface")
    interception = options.get("-m", "")
    if interception not in ("", "REDIRECT", "TPROXY"):
        found.add("interception-mode-spelling")
    if interception == "TPROXY":
        if options.get("-t", "").strip() in ("0", "1338"):
            found.add("tproxy-mark-reserved")
        if options.get("-r", "").strip() in ("0", "253", "254", "255"):
            found.add("tproxy-table-reserved")
    elif any(_not_a_number(options[f]) for f in ("-t", "-r") if f in options):
        found.add("checked-though-unused")
    if (
        options.get("-b", "") != "*"
        and "-d" in options
        and _refused(lambda: v.parse_ports("-d", options["-d"]))
    ):
        found.add("checked-though-unused")
    for flag in ("-u", "-g"):
        if flag in options and options[flag] and not _items(options[flag]):
            found.add("empty-id-list")
    include = options.get("--owner-groups-include", "*")
    groups = 0 if include == "*" else len(_items(include))
    if groups == 64 and mode is Mode.NFT:
        found.add("owner-groups-64")
    if 50 <= groups < 64:
        found.add("owner-groups-50-to-63")
    dns = "--redirect-dns" in switches and "--capture-all-dns" not in switches
    if mode is Mode.NFT and dns and options.get("--dns-servers-v6") and not ipv6:
        found.add("dns-ipv6-servers-on-ipv4-pod")
    return found


def allowed(ids: set[str], mode: Mode) -> list[Difference]:
    """The entries among ``ids`` on which ours and Istio's part in ``mode``."""
    return [BY_ID[i] for i in sorted(ids) if BY_ID[i].differs(mode)]
