"""Build a redirect spec from istio-iptables flags, exactly as the istio-init container gets them.

The same flag set serves three callers: ``rules`` and ``apply`` on the command line, and the
agent reading an injected istio-init's args (or the webhook's copy of them in an annotation).
Flags Istio's injector passes that do not change the rules (logging, validation, dry-run) are
accepted and ignored; any other unknown flag is an error, so a typo never silently changes what
gets captured. Arguments from a pod are read by ``spec.argv`` (argparse's meaning, linear cost)
within the bounds of ``spec.limits``; the command line keeps argparse for its help text.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..bounded import utf8_size
from . import values as v
from .argv import Option, OptionTable, read_options
from .errors import SpecError, check_limit
from .limits import MAX_ARG_BYTES, MAX_ARGS
from .model import (
    DEFAULT_INBOUND_CAPTURE_PORT,
    DEFAULT_INBOUND_TUNNEL_PORT,
    DEFAULT_PROXY_PORT,
    DEFAULT_PROXY_UID,
    DEFAULT_TPROXY_MARK,
    DEFAULT_TPROXY_ROUTE_TABLE,
    MAX_MARK,
    InterceptionMode,
    OwnerGroups,
    RedirectSpec,
)


@dataclass(frozen=True, slots=True)
class Flag:
    dest: str
    names: tuple[str, ...]
    help: str
    boolean: bool = False


# The flags that shape the rules. Short names are istio-iptables'; long names are its long
# names (and, for the environment-only settings, ours).
FLAGS: tuple[Flag, ...] = (
    Flag("proxy_port", ("-p", "--envoy-port"), f"outbound capture port (default {DEFAULT_PROXY_PORT})"),
    Flag(
        "inbound_capture_port",
        ("-z", "--inbound-capture-port"),
        f"inbound capture port (default {DEFAULT_INBOUND_CAPTURE_PORT})",
    ),
    Flag(
        "inbound_tunnel_port",
        ("-e", "--inbound-tunnel-port"),
        f"inbound tunnel port, never captured (default {DEFAULT_INBOUND_TUNNEL_PORT})",
    ),
    Flag("proxy_uid", ("-u", "--proxy-uid"), f"proxy UIDs, comma list (default {DEFAULT_PROXY_UID})"),
    Flag("proxy_gid", ("-g", "--proxy-gid"), "proxy GIDs, comma list (default: the UIDs)"),
    Flag(
        "mode",
        ("-m", "--istio-inbound-interception-mode"),
        "inbound interception mode: REDIRECT (default) or TPROXY",
    ),
    Flag("inbound_ports", ("-b", "--istio-inbound-ports"), "inbound ports to capture: '*', a list, or ''"),
    Flag(
        "inbound_ports_exclude",
        ("-d", "--istio-local-exclude-ports"),
        "inbound ports not captured (with -b '*')",
    ),
    Flag("exclude_interfaces", ("-c", "--istio-exclude-interfaces"), "interfaces never captured"),
    Flag("outbound_cidrs", ("-i", "--istio-service-cidr"), "outbound CIDRs to capture: '*', a list, or ''"),
    Flag("outbound_cidrs_exclude", ("-x", "--istio-service-exclude-cidr"), "outbound CIDRs not captured"),
    Flag("outbound_ports_include", ("-q", "--istio-outbound-ports"), "outbound ports always captured"),
    Flag(
        "outbound_ports_exclude",
        ("-o", "--istio-local-outbound-ports-exclude"),
        "outbound ports never captured (tcp and udp)",
    ),
    Flag(
        "virtual_interfaces",
        ("-k", "--kube-virt-interfaces", "--reroute-virtual-interfaces"),
        "virtual interfaces whose inbound traffic is treated as outbound",
    ),
    Flag(
        "tproxy_mark",
        ("-t", "--istio-inbound-tproxy-mark"),
        f"TPROXY mark (default {DEFAULT_TPROXY_MARK})",
    ),
    Flag(
        "tproxy_route_table",
        ("-r", "--istio-inbound-tproxy-route-table"),
        f"TPROXY route table (default {DEFAULT_TPROXY_ROUTE_TABLE})",
    ),
    Flag("redirect_dns", ("--redirect-dns",), "capture DNS to the agent on 15053", boolean=True),
    Flag(
        "capture_all_dns",
        ("--capture-all-dns",),
        "with --redirect-dns: capture all port-53 traffic, not just the listed servers",
        boolean=True,
    ),
    Flag("drop_invalid", ("--drop-invalid",), "drop conntrack-INVALID packets", boolean=True),
    Flag("ipv6", ("--ipv6",), "also write ip6tables rules (the pod has an IPv6 address)", boolean=True),
    Flag("dns_servers_v4", ("--dns-servers-v4",), "IPv4 DNS servers to capture (comma list)"),
    Flag("dns_servers_v6", ("--dns-servers-v6",), "IPv6 DNS servers to capture (comma list)"),
    Flag("owner_groups_include", ("--owner-groups-include",), "capture only these groups ('*' = all)"),
    Flag("owner_groups_exclude", ("--owner-groups-exclude",), "never capture these groups"),
    Flag(
        "host_ipv4_loopback_cidr",
        ("--host-ipv4-loopback-cidr",),
        "what counts as local (default 127.0.0.1/32)",
    ),
)

# Flags istio-iptables accepts that do not change the ruleset: accepted and ignored.
IGNORED_VALUE_FLAGS = (
    "--log_output_level",
    "--log_stacktrace_level",
    "--log_caller",
    "--log_target",
    "--log_rotate",
    "--log_rotate_max_age",
    "--log_rotate_max_size",
    "--log_rotate_max_backups",
    "--iptables-probe-port",
    "--probe-timeout",
    "--network-namespace",
)
IGNORED_BOOL_FLAGS = (
    "--log_as_json",
    "--run-validation",
    "--skip-rule-apply",
    "--dry-run",
    "--restore-format",
    "--cni-mode",
    "--host-nsenter-exec",
    "--dual-stack",
    "--reconcile",
    "--cleanup-only",
    "--force-apply",
)
# Istio's injector adds it to istio-init when installed with values.global.nativeNftables. Which
# mode a sandbox gets is the node agent's setting (run --native-nftables), as it is the CNI
# plugin's in Istio's CNI mode, never the pod's: ignored in a pod's flags. (On the command line of
# `rules` and `apply` it is the mode flag itself.)
POD_IGNORED_BOOL_FLAGS = ("--native-nftables",)
IGNORED_SHORT_BOOL = ("-n", "-f")

_BOOL_FLAGS = {n for f in FLAGS if f.boolean for n in f.names} | {
    *IGNORED_BOOL_FLAGS,
    *POD_IGNORED_BOOL_FLAGS,
}
_DEST_TO_NAME = {f.dest: f.names[0] for f in FLAGS}


def _ignored_dest(name: str) -> str:
    return "ignored_" + name.strip("-")


# The same options add_redirect_flags gives argparse, for the linear reader.
OPTIONS = OptionTable.of(
    [Option(f.dest, f.names, takes_value=not f.boolean) for f in FLAGS]
    + [Option(_ignored_dest(n), (n,), takes_value=True) for n in IGNORED_VALUE_FLAGS]
    + [
        Option(_ignored_dest(n), (n,), takes_value=False)
        for n in (*IGNORED_BOOL_FLAGS, *IGNORED_SHORT_BOOL, *POD_IGNORED_BOOL_FLAGS)
    ]
)


def add_redirect_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("istio-iptables flags (as istio-init receives them)")
    for flag in FLAGS:
        if flag.boolean:
            group.add_argument(*flag.names, dest=flag.dest, action="store_true", default=None, help=flag.help)
        else:
            group.add_argument(*flag.names, dest=flag.dest, metavar="VALUE", default=None, help=flag.help)
    for name in IGNORED_VALUE_FLAGS:
        group.add_argument(name, dest=_ignored_dest(name), default=None, help=argparse.SUPPRESS)
    for name in (*IGNORED_BOOL_FLAGS, *IGNORED_SHORT_BOOL):
        group.add_argument(
            name, dest=_ignored_dest(name), action="store_true", default=None, help=argparse.SUPPRESS
        )


def check_arg_count(field: str, argv: Sequence[object]) -> None:
    """At most MAX_ARGS arguments: checked before any parsing (argparse's cost is quadratic)."""
    check_limit(field, len(argv), "arguments", MAX_ARGS)


def normalize_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, bool]]:
    """Rewrite Go-flag spellings argparse does not know: ``-p=15001`` and ``--flag=BOOL``.

    Returns the argv for argparse and the boolean flags explicitly set to false.
    """
    out: list[str] = []
    falses: dict[str, bool] = {}
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name in _BOOL_FLAGS:
            if v.parse_bool(name, value):
                out.append(name)
            else:
                falses[name] = False
            continue
        if eq and len(name) == 2 and name[0] == "-" and name[1].isalpha():
            out += [name, value]
            continue
        out.append(arg)
    return out, falses


def parse_flags(argv: Sequence[str], *, field: str = "istio-iptables") -> RedirectSpec:
    """istio-iptables argv (without the program name) -> spec. Raises SpecError.

    Linear in the size of ``argv``; ``field`` names the input in a LimitError for its length."""
    check_arg_count(field, argv)
    normalized, falses = normalize_argv(argv)
    read = read_options(normalized, OPTIONS)
    if read.extras:
        raise SpecError(read.extras[0], read.extras[0], "unknown istio-iptables flag or stray argument")
    return spec_from_args(argparse.Namespace(**read.values), falses=falses)


def _text(ns: argparse.Namespace, dest: str) -> str | None:
    value: Any = getattr(ns, dest, None)
    return None if value is None else str(value)


def spec_from_args(ns: argparse.Namespace, *, falses: dict[str, bool] | None = None) -> RedirectSpec:
    """Turn parsed flags into a spec; every value goes through a parser of ``values``."""
    falses = falses or {}

    def text(dest: str, default: str = "") -> str:
        raw = _text(ns, dest)
        if raw is None:
            return default
        check_limit(name(dest), utf8_size(raw), "bytes", MAX_ARG_BYTES)
        return raw

    def flag(dest: str) -> bool:
        names = next(f.names for f in FLAGS if f.dest == dest)
        if any(n in falses for n in names):
            return False
        return bool(getattr(ns, dest, None))

    def name(dest: str) -> str:
        return _DEST_TO_NAME[dest]

    def given(dest: str) -> str | None:
        """The flag's value as written, None when the flag is absent."""
        raw = _text(ns, dest)
        return None if raw is None else text(dest)

    # istio-iptables defaults an empty -u (to its proxy user, 1337 here) and -g (to the UIDs).
    uid_text = text("proxy_uid")
    uids = v.parse_ids(name("proxy_uid"), uid_text, what="a UID") if uid_text else (DEFAULT_PROXY_UID,)
    gid_text = text("proxy_gid")
    gids = v.parse_ids(name("proxy_gid"), gid_text, what="a GID") if gid_text else uids

    # Exactly as istio-iptables compares it; it takes any other text for REDIRECT, silently.
    mode_text = text("mode")
    if mode_text in ("", InterceptionMode.REDIRECT.value):
        mode = InterceptionMode.REDIRECT
    elif mode_text == InterceptionMode.TPROXY.value:
        mode = InterceptionMode.TPROXY
    else:
        raise SpecError(
            name("mode"),
            mode_text,
            "interception mode is REDIRECT or TPROXY, in capitals "
            "(istio-iptables reads anything else as REDIRECT)",
        )

    include_groups = text("owner_groups_include", "*")
    exclude_groups = text("owner_groups_exclude")
    owner_groups = owner_groups_from(
        include_groups,
        exclude_groups,
        include_field="--owner-groups-include",
        exclude_field="--owner-groups-exclude",
    )

    def port_or_default(dest: str, default: int) -> int:
        # Absent: the default. Given, even empty: a port (istio-iptables writes an empty one).
        raw = given(dest)
        return default if raw is None else v.parse_port(name(dest), raw)

    def number_or_default(dest: str, default: int, what: str) -> int:
        raw = given(dest)
        return default if raw is None else v.parse_int(name(dest), raw, low=0, high=MAX_MARK, what=what)

    tunnel_text = given("inbound_tunnel_port")
    tunnel = (
        DEFAULT_INBOUND_TUNNEL_PORT
        if tunnel_text is None
        else v.parse_port_or_range(name("inbound_tunnel_port"), tunnel_text)
    )

    loopback_text = text("host_ipv4_loopback_cidr")
    extra: dict[str, Any] = {}
    if loopback_text:
        extra["host_ipv4_loopback_cidr"] = v.parse_cidr(name("host_ipv4_loopback_cidr"), loopback_text)

    excluded_cidrs_text = text("outbound_cidrs_exclude")
    return RedirectSpec(
        proxy_port=port_or_default("proxy_port", DEFAULT_PROXY_PORT),
        inbound_capture_port=port_or_default("inbound_capture_port", DEFAULT_INBOUND_CAPTURE_PORT),
        inbound_tunnel_port=tunnel,
        proxy_uids=uids,
        proxy_gids=gids,
        mode=mode,
        inbound_ports=v.parse_port_selection(name("inbound_ports"), text("inbound_ports")),
        inbound_ports_exclude=v.parse_ports_no_wildcard(
            name("inbound_ports_exclude"), text("inbound_ports_exclude")
        ),
        outbound_cidrs=v.parse_cidr_selection(name("outbound_cidrs"), text("outbound_cidrs")),
        outbound_cidrs_exclude=v.parse_cidrs(name("outbound_cidrs_exclude"), excluded_cidrs_text),
        outbound_ports_include=v.parse_ports_no_wildcard(
            name("outbound_ports_include"), text("outbound_ports_include")
        ),
        outbound_ports_exclude=v.parse_ports_no_wildcard(
            name("outbound_ports_exclude"), text("outbound_ports_exclude")
        ),
        reroute_virtual_interfaces=v.parse_interfaces(name("virtual_interfaces"), text("virtual_interfaces")),
        exclude_interfaces=v.parse_interfaces(name("exclude_interfaces"), text("exclude_interfaces")),
        tproxy_mark=number_or_default("tproxy_mark", DEFAULT_TPROXY_MARK, "a mark"),
        tproxy_route_table=number_or_default(
            "tproxy_route_table", DEFAULT_TPROXY_ROUTE_TABLE, "a route table"
        ),
        redirect_dns=flag("redirect_dns"),
        capture_all_dns=flag("capture_all_dns"),
        drop_invalid=flag("drop_invalid"),
        ipv6=flag("ipv6"),
        dns_servers_v4=v.parse_dns_servers(name("dns_servers_v4"), text("dns_servers_v4"), version=4),
        dns_servers_v6=v.parse_dns_servers(name("dns_servers_v6"), text("dns_servers_v6"), version=6),
        owner_groups=owner_groups,
        **extra,
    )


def owner_groups_from(include: str, exclude: str, *, include_field: str, exclude_field: str) -> OwnerGroups:
    """istio-iptables' owner-group filter: exactly ``*`` captures all groups but the excluded
    ones; a list captures only the listed groups, and the exclusions then do not apply (as
    istio-iptables documents it and does: it does not read them)."""
    if include == v.WILDCARD:
        return OwnerGroups(except_=True, values=v.parse_groups(exclude_field, exclude))
    if v.WILDCARD in include:
        raise SpecError(include_field, include, "'*' stands alone, without spaces or groups")
    return OwnerGroups(except_=False, values=v.parse_groups(include_field, include))
