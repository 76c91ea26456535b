"""istio-iptables flag parsing: spellings Go's flag package accepts, ignored and unknown flags."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.commands.common import Parser, UsageError
from istio_pod_network_controller.spec import InterceptionMode, SpecError, parse_flags
from istio_pod_network_controller.spec.argv import read_options
from istio_pod_network_controller.spec.errors import LimitError
from istio_pod_network_controller.spec.flags import OPTIONS, POD_IGNORED_BOOL_FLAGS, add_redirect_flags
from istio_pod_network_controller.spec.limits import (
    MAX_ARG_BYTES,
    MAX_ARGS,
    MAX_LIST_ITEMS,
    MAX_OWNER_GROUPS_INCLUDE,
)


def test_defaults_match_istio_iptables() -> None:
    spec = parse_flags([])
    assert (spec.proxy_port, spec.inbound_capture_port, spec.inbound_tunnel_port) == (15001, 15006, 15008)
    assert spec.proxy_uids == (1337,) and spec.proxy_gids == (1337,)
    assert spec.inbound_ports.empty and not spec.outbound_cidrs.wildcard
    assert spec.mode is InterceptionMode.REDIRECT


def test_gids_default_to_the_uids() -> None:
    assert parse_flags(["-u", "3,4"]).proxy_gids == (3, 4)


def test_injector_only_flags_are_accepted_and_ignored() -> None:
    base = parse_flags(["-p", "15001"])
    noisy = parse_flags(
        ["-p", "15001", "--log_output_level=default:info", "--run-validation", "--skip-rule-apply"]
    )
    assert noisy == base


@pytest.mark.parametrize("flag", ["--native-nftables", "--native-nftables=true", "--native-nftables=false"])
def test_a_pods_native_nftables_flag_is_ignored(flag: str) -> None:
    # Istio's injector adds it with values.global.nativeNftables; the mode is the agent's setting.
    assert parse_flags(["-p", "15001", flag]) == parse_flags(["-p", "15001"])


def test_go_flag_spellings() -> None:
    assert parse_flags(["-p=15002"]).proxy_port == 15002
    assert parse_flags(["--envoy-port=15003"]).proxy_port == 15003
    assert parse_flags(["--redirect-dns=true", "--capture-all-dns"]).dns_enabled
    assert not parse_flags(["--redirect-dns=false"]).redirect_dns


def test_unknown_flag_is_an_error_not_silently_dropped() -> None:
    with pytest.raises(SpecError, match="--iptables-trace-logging"):
        parse_flags(["--iptables-trace-logging"])


def test_owner_group_exclusions_do_not_apply_to_a_list() -> None:
    # As istio-iptables documents and does: the exclusions apply only with '*'.
    spec = parse_flags(["--owner-groups-include", "java", "--owner-groups-exclude", "ftp"])
    assert spec.owner_groups == parse_flags(["--owner-groups-include", "java"]).owner_groups


def test_loopback_cidr_must_be_loopback() -> None:
    with pytest.raises(SpecError, match="host-ipv4-loopback-cidr"):
        parse_flags(["--host-ipv4-loopback-cidr", "10.0.0.1/32"])


def test_reserved_route_table_is_rejected() -> None:
    with pytest.raises(SpecError, match="-r"):
        parse_flags(["-m", "TPROXY", "-r", "254"])


# -- the linear reader means what argparse means -------------------------------------------------


def _argparse_reading(argv: list[str]) -> tuple[dict[str, object], list[str]] | str:
    parser = Parser(prog="istio-iptables", add_help=False, allow_abbrev=False)
    add_redirect_flags(parser)
    # Ignored in a pod's flags only (the command lines give --native-nftables a meaning).
    for name in POD_IGNORED_BOOL_FLAGS:
        parser.add_argument(name, dest="ignored_" + name.strip("-"), action="store_true", default=None)
    try:
        namespace, extras = parser.parse_known_args(argv)
    except UsageError as exc:
        return str(SpecError("arguments", "", str(exc)))  # how the linear reader words it
    # argparse drops an attached "--" ("--envoy-port=--" stores []); the reader keeps what was
    # written. Either way the value is then refused, so this is the one difference allowed.
    values = {k: "--" if v == [] else v for k, v in vars(namespace).items() if v is not None}
    return values, extras


def _linear_reading(argv: list[str]) -> tuple[dict[str, object], list[str]] | str:
    try:
        read = read_options(argv, OPTIONS)
    except SpecError as exc:
        return str(exc)
    return dict(read.values), read.extras


_SPELLINGS = sorted(OPTIONS.by_name)
_ODD = ["1", "", "-1", "-1.5", "-.5", "a b", "-a b", "--", "-", "-x-1", "-x1,2", "-nf", "-nx", "-nZ",
        "-n=", "-nfp", "-fp1", "--dry-run=", "--envoy-port=", "--envoy-port=--", "--envoy-port==1", "-p--",
        "-p=", "-p=1", "--bogus", "--bogus=1", "-Z", "=", "x=y", "-1\n", "--envoy", "-n-", "-- ", "-b*",
        "é"]  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(_SPELLINGS), st.sampled_from(_ODD), st.text(max_size=4)), max_size=10)
)
def test_the_linear_reader_reads_arguments_exactly_as_argparse(argv: list[str]) -> None:
    assert _linear_reading(argv) == _argparse_reading(argv)


def test_the_reader_keeps_the_last_of_repeated_options_and_the_extras_in_order() -> None:
    read = read_options(["-d", "1", "stray", "-d", "2", "--", "-p", "3"], OPTIONS)
    assert read.values == {"inbound_ports_exclude": "2"}
    assert read.extras == ["stray", "--", "-p", "3"]


# -- limits --------------------------------------------------------------------------------------


def test_too_many_arguments_are_refused_before_parsing() -> None:
    with pytest.raises(LimitError) as info:
        parse_flags(["-d", "1"] * 200)
    assert str(info.value) == f"istio-iptables: 400 arguments, more than the limit of {MAX_ARGS}"
    parse_flags(["-d", "1"] * (MAX_ARGS // 2))  # at the limit: accepted


def test_a_flag_value_longer_than_the_limit_is_refused_naming_the_flag() -> None:
    with pytest.raises(
        LimitError, match=rf"^-o: {MAX_ARG_BYTES + 1} bytes, more than the limit of {MAX_ARG_BYTES}$"
    ):
        parse_flags(["-o", " " * (MAX_ARG_BYTES + 1)])
    with pytest.raises(LimitError, match=r"^-p: [0-9]+ bytes"):  # named as every error names it
        parse_flags(["--envoy-port=" + "1" * (MAX_ARG_BYTES + 1)])


@pytest.mark.parametrize(
    ("flag", "item"),
    [("-x", "10.0.0.1/32"), ("-i", "10.0.0.1/32"), ("-d", "1"), ("-q", "1"), ("-o", "1"), ("-b", "1"),
     ("-c", "eth0"), ("-k", "eth0"), ("-u", "1"), ("-g", "1"), ("--owner-groups-exclude", "1"),
     ("--dns-servers-v4", "10.0.0.1"), ("--dns-servers-v6", "::1")],
)  # fmt: skip
def test_a_list_longer_than_the_limit_is_refused_naming_the_flag(flag: str, item: str) -> None:
    parse_flags([flag, ",".join([item] * MAX_LIST_ITEMS)])  # at the limit (duplicates and all)
    with pytest.raises(LimitError) as info:
        parse_flags([flag, ",".join([item] * (MAX_LIST_ITEMS + 1))])
    assert str(info.value) == f"{flag}: {MAX_LIST_ITEMS + 1} items, more than the limit of {MAX_LIST_ITEMS}"


def test_empty_list_items_do_not_count_towards_the_limit() -> None:
    assert parse_flags(["-d", "1" + "," * (MAX_LIST_ITEMS * 2)]).inbound_ports_exclude == (1,)


def test_owner_groups_include_has_istio_iptables_own_limit() -> None:
    groups = ",".join(str(g) for g in range(MAX_OWNER_GROUPS_INCLUDE + 1))
    with pytest.raises(
        LimitError,
        match=f"--owner-groups-include: 65 groups, more than the limit of {MAX_OWNER_GROUPS_INCLUDE}",
    ):
        parse_flags(["--owner-groups-include", groups])


def test_repeated_items_are_kept_in_order_as_istio_writes_them() -> None:
    spec = parse_flags(["-b", "80,80", "-u", "1,1", "-c", "eth1,eth1", "-i", "10.0.0.0/8,10.0.0.0/8"])
    assert spec.inbound_ports.ports == (80, 80)
    assert spec.proxy_uids == (1, 1)
    assert spec.exclude_interfaces == ("eth1", "eth1")
    assert len(spec.outbound_cidrs.cidrs) == 2


def test_port_ranges_keep_their_spelling_and_cover_their_ports() -> None:
    spec = parse_flags(["-o", "8000:8010,:80,9000-9010", "-e", "60000:"])
    first, open_low, dashed = spec.outbound_ports_exclude
    assert (str(first), str(open_low), str(dashed)) == ("8000:8010", ":80", "9000-9010")
    assert 8005 in spec.outbound_ports_exclude and 80 in spec.outbound_ports_exclude
    assert 8011 not in spec.outbound_ports_exclude
    assert str(spec.inbound_tunnel_port) == "60000:"


def test_port_zero_is_a_port_as_for_istio() -> None:
    assert parse_flags(["-p", "0", "-b", "0"]).proxy_port == 0


def test_mark_and_table_are_checked_against_tproxy_only_where_tproxy_uses_them() -> None:
    parse_flags(["-t", "1338", "-r", "254"])  # REDIRECT: istio-iptables ignores both
    with pytest.raises(SpecError, match=r"^-t: .*1338"):
        parse_flags(["-m", "TPROXY", "-t", "1338"])
    with pytest.raises(SpecError, match=r"^-r: .*main"):
        parse_flags(["-m", "TPROXY", "-r", "254"])


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["-b", "010"], "without leading zeros"),
        (["-u", "010"], "without leading zeros"),
        (["-b", "0x50"], "decimal"),
        (["-b", "http"], "service names are refused"),
        (["-b", "80, "], "blank item"),
        (["-b", " *"], "stands alone"),
        (["-p", ""], "missing"),
        (["-m", "tproxy"], "in capitals"),
        (["-i", "10.0.0.0/08"], "leading zeros"),
        (["-c", "e+th"], "at the end"),
    ],
)
def test_what_istio_reads_otherwise_or_refuses_is_refused_in_one_line(argv: list[str], reason: str) -> None:
    with pytest.raises(SpecError, match=reason) as refused:
        parse_flags(argv)
    assert str(refused.value).startswith(f"{argv[0]}: invalid value ")
    assert "\n" not in str(refused.value)


def test_ipv4_mapped_loopback_is_loopback() -> None:
    assert parse_flags(["-i", "::ffff:127.0.0.1/128"]).outbound_cidrs.has_loopback
    assert not parse_flags(["-i", "::ffff:10.0.0.1/128"]).outbound_cidrs.has_loopback
