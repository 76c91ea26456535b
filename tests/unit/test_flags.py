"""istio-iptables flag parsing: spellings Go's flag package accepts, ignored and unknown flags."""

from __future__ import annotations

import pytest

from istio_pod_network_controller.spec import InterceptionMode, SpecError, parse_flags


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


def test_go_flag_spellings() -> None:
    assert parse_flags(["-p=15002"]).proxy_port == 15002
    assert parse_flags(["--envoy-port=15003"]).proxy_port == 15003
    assert parse_flags(["--redirect-dns=true", "--capture-all-dns"]).dns_enabled
    assert not parse_flags(["--redirect-dns=false"]).redirect_dns


def test_unknown_flag_is_an_error_not_silently_dropped() -> None:
    with pytest.raises(SpecError, match="--iptables-trace-logging"):
        parse_flags(["--iptables-trace-logging"])


def test_owner_group_list_and_exclusions_together_are_ambiguous() -> None:
    with pytest.raises(SpecError, match="not both"):
        parse_flags(["--owner-groups-include", "java", "--owner-groups-exclude", "ftp"])


def test_loopback_cidr_must_be_loopback() -> None:
    with pytest.raises(SpecError, match="host-ipv4-loopback-cidr"):
        parse_flags(["--host-ipv4-loopback-cidr", "10.0.0.1/32"])


def test_reserved_route_table_is_rejected() -> None:
    with pytest.raises(SpecError, match="-r"):
        parse_flags(["-m", "TPROXY", "-r", "254"])
