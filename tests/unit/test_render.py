"""Rendering semantics, pinned rule by rule (the conformance vectors check whole rulesets)."""

from __future__ import annotations

import pytest

from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import SpecError, parse_flags

SIDECAR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
           "-d", "15090,15021,15020"]  # fmt: skip


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def test_default_sidecar_ruleset_is_exactly_istios() -> None:
    ruleset = render(parse_flags(SIDECAR))
    assert lines(ruleset.iptables) == [
        "* nat",
        "-N ISTIO_INBOUND",
        "-N ISTIO_REDIRECT",
        "-N ISTIO_IN_REDIRECT",
        "-N ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        "COMMIT",
    ]
    assert ruleset.ip6tables == ""
    assert ruleset.tproxy is None


def test_excluded_inbound_ports_are_only_used_with_wildcard() -> None:
    listed = render(parse_flags([*SIDECAR, "-b", "8080"])).iptables
    assert "--dport 15090 -j RETURN" not in listed
    assert "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT" in listed


def test_empty_inbound_list_captures_no_inbound_traffic() -> None:
    text = render(parse_flags([*SIDECAR, "-b", ""])).iptables
    assert "PREROUTING" not in text


def test_cidrs_go_only_to_their_own_family() -> None:
    ruleset = render(parse_flags(["-i", "10.0.0.0/8,fd00::/8", "-x", "10.1.0.0/16,fd00:1::/32", "--ipv6"]))
    assert "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT" in ruleset.iptables
    assert "fd00" not in ruleset.iptables
    assert "-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT" in ruleset.ip6tables
    assert "-A ISTIO_OUTPUT -d fd00:1::/32 -j RETURN" in ruleset.ip6tables
    assert "10.0.0.0" not in ruleset.ip6tables


def test_excluded_outbound_ports_return_for_tcp_and_udp_before_anything_else() -> None:
    out = lines(render(parse_flags([*SIDECAR, "-o", "5555"])).iptables)
    first = out.index("-A OUTPUT -j ISTIO_OUTPUT")
    assert out[first + 1 : first + 3] == [
        "-A ISTIO_OUTPUT -p tcp --dport 5555 -j RETURN",
        "-A ISTIO_OUTPUT -p udp --dport 5555 -j RETURN",
    ]


def test_included_loopback_range_keeps_local_traffic_captured() -> None:
    text = render(parse_flags(["-i", "127.0.0.0/8"])).iptables
    assert "-o lo -m owner ! --uid-owner" not in text
    assert "-A ISTIO_OUTPUT -d 127.0.0.0/8 -j ISTIO_REDIRECT" in text


def test_dns_capture_without_servers_or_capture_all_is_off_as_in_istio() -> None:
    assert "15053" not in render(parse_flags(["--redirect-dns"])).iptables
    assert (
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053"
        in render(parse_flags(["--redirect-dns", "--capture-all-dns"])).iptables
    )


def test_tproxy_mode_needs_a_policy_route_and_ipv6_needs_the_passthrough_address() -> None:
    ruleset = render(parse_flags([*SIDECAR, "-m", "TPROXY", "-t", "1400", "-r", "140", "--ipv6"]))
    assert ruleset.tproxy is not None
    assert (ruleset.tproxy.mark, ruleset.tproxy.table) == (1400, 140)
    assert "--tproxy-mark 1400/0xffffffff --on-port 15006" in ruleset.iptables
    assert ruleset.ipv6_passthrough_address


def test_host_loopback_cidr_replaces_127_0_0_1() -> None:
    text = render(parse_flags(["--host-ipv4-loopback-cidr", "127.0.0.1/8"])).iptables
    assert "-A ISTIO_OUTPUT -d 127.0.0.1/8 -j RETURN" in text
    assert "127.0.0.1/32" not in text


def test_owner_group_include_becomes_one_rule() -> None:
    text = render(parse_flags(["--owner-groups-include", "202,java"])).iptables
    assert "-A ISTIO_OUTPUT -m owner ! --gid-owner 202 -m owner ! --gid-owner java -j RETURN" in text


def test_ruleset_hash_changes_with_the_rules() -> None:
    a = render(parse_flags(SIDECAR))
    b = render(parse_flags([*SIDECAR, "-o", "5555"]))
    assert a.sha256() == render(parse_flags(SIDECAR)).sha256()
    assert a.sha256() != b.sha256()
    assert a.rule_count() == 18


def test_repeated_items_make_one_rule_each_as_in_istio() -> None:
    text = render(parse_flags(["-b", "80,80", "-o", "15020,15020", "-i", "10.0.0.0/8,10.0.0.0/8"])).iptables
    assert text.count("-A ISTIO_INBOUND -p tcp --dport 80 -j ISTIO_IN_REDIRECT") == 2
    assert text.count("-A ISTIO_OUTPUT -p udp --dport 15020 -j RETURN") == 2
    assert text.count("-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT") == 2


def test_port_ranges_are_written_as_iptables_reads_them() -> None:
    args = ["-b", "8000:8010,:80", "-e", "9000:9010", "--redirect-dns", "--capture-all-dns"]
    text = render(parse_flags(args)).iptables
    assert "-A ISTIO_INBOUND -p tcp --dport 8000:8010 -j ISTIO_IN_REDIRECT" in text
    assert "-A ISTIO_INBOUND -p tcp --dport 0:80 -j ISTIO_IN_REDIRECT" in text
    assert "-A ISTIO_INBOUND -p tcp --dport 9000:9010 -j RETURN" in text
    assert "! --dports 53,9000:9010" in text


def test_nft_range_spelling_is_refused_in_iptables_mode_as_istio_does() -> None:
    spec = parse_flags(["-o", "8000-8010"])  # the spec holds it: nft mode writes it
    with pytest.raises(SpecError, match=r"^-o: invalid value '8000-8010': nft's range spelling"):
        render(spec)


def test_interface_wildcards_are_passed_to_iptables() -> None:
    text = render(parse_flags(["-c", "eth+", "-k", "veth+"])).iptables
    assert "-A PREROUTING -i eth+ -j RETURN" in text
    assert "-I PREROUTING 1 -i veth+ -j RETURN" in text


def test_fifty_included_owner_groups_are_refused_in_iptables_mode() -> None:
    render(parse_flags(["--owner-groups-include", ",".join(str(1000 + i) for i in range(49))]))
    spec = parse_flags(["--owner-groups-include", ",".join(str(1000 + i) for i in range(50))])
    with pytest.raises(SpecError, match="50 groups: iptables mode") as refused:
        render(spec)
    assert "\n" not in str(refused.value)


def test_ipv4_mapped_loopback_counts_as_loopback_as_in_go() -> None:
    mapped = render(parse_flags(["-i", "::ffff:127.0.0.1/128", "--ipv6"])).ip6tables
    assert "-o lo -m owner ! --uid-owner" not in mapped
    plain = render(parse_flags(["-i", "::ffff:10.0.0.1/128", "--ipv6"])).ip6tables
    assert "-o lo -m owner ! --uid-owner" in plain


def test_no_pod_makes_more_rules_than_the_limit_in_either_mode() -> None:
    # Each -k interface adds a rule per -i CIDR: 1,000 of each would be a million rules in the
    # agent. Both renderers stop once past MAX_RULES, with one line.
    from istio_pod_network_controller.render.nftables import render_nftables
    from istio_pod_network_controller.spec.errors import TooManyRules
    from istio_pod_network_controller.spec.limits import MAX_RULES

    cidrs = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(1000))
    huge = parse_flags(["-i", cidrs, "-k", ",".join(["eth0"] * 1000)])
    for renderer in (render, render_nftables):
        with pytest.raises(TooManyRules, match=f"more than {MAX_RULES} rules for one pod") as caught:
            renderer(huge)
        assert "\n" not in str(caught.value)
    fine = parse_flags(["-i", cidrs, "-k", "eth0,eth1,eth2,eth3"])
    assert render(fine).rule_count() == render_nftables(fine).rule_count() > 5000
