"""The nftables renderer: Istio's 28 native-nftables goldens text for text, and where Istio's nft
mode writes rules nft refuses, rules that load and mean what the iptables mode means."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.render import render
from istio_pod_network_controller.render.nftables import (
    MAX_CHAINED_GROUPS,
    NFT_KEYWORDS,
    ChainName,
    Name,
    NftRuleset,
    TableName,
    render_nftables,
)
from istio_pod_network_controller.render.ruleset import TproxyRoute
from istio_pod_network_controller.spec import SpecError, parse_flags

VECTORS = Path(__file__).resolve().parents[1] / "conformance" / "istio-nftables"
VECTOR_FILES = sorted(VECTORS.glob("*.json"))
ISTIO_NFT_CASES = 28


def vector(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def nft(*args: str) -> NftRuleset:
    return render_nftables(parse_flags(["-b", "", "-i", "", *args]))


def lines(ruleset: NftRuleset) -> list[str]:
    return ruleset.text().splitlines()


def test_every_istio_nft_case_has_a_vector() -> None:
    assert len(VECTOR_FILES) == ISTIO_NFT_CASES
    versions = {vector(path)["istio_version"] for path in VECTOR_FILES}
    assert len(versions) == 1, "all vectors come from one Istio version"


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_ruleset_text_is_istios_golden(path: Path) -> None:
    vec = vector(path)
    assert render_nftables(parse_flags(vec["args"])).text() == vec["nftables"]


def test_json_output_is_the_nft_text() -> None:
    ruleset = nft()
    assert ruleset.to_json() == {"nftables": ruleset.text()}
    assert ruleset.text().startswith("add table inet istio-proxy-nat\nflush table inet istio-proxy-nat\n")


def test_tables_appear_only_when_needed() -> None:
    assert [t.name for t in nft().tables] == [TableName.NAT]
    assert [t.name for t in nft("-m", "TPROXY").tables] == [TableName.NAT, TableName.MANGLE]
    assert [t.name for t in nft("--drop-invalid").tables] == [TableName.NAT, TableName.MANGLE]
    dns = nft("--redirect-dns", "--dns-servers-v4", "10.96.0.10")
    assert [t.name for t in dns.tables] == [TableName.NAT, TableName.RAW]
    # --redirect-dns without servers or --capture-all-dns captures no DNS (as in iptables mode).
    assert [t.name for t in nft("--redirect-dns").tables] == [TableName.NAT]


def test_base_chains_hook_as_the_iptables_tables_do() -> None:
    text = nft("-m", "TPROXY", "-b", "*", "-k", "eth0", "--redirect-dns", "--capture-all-dns").text()
    for declaration in (
        "add chain inet istio-proxy-nat prerouting { type nat hook prerouting priority -100 ; }",
        "add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }",
        "add chain inet istio-proxy-mangle prerouting { type filter hook prerouting priority -150 ; }",
        "add chain inet istio-proxy-mangle output { type route hook output priority -150 ; }",
        "add chain inet istio-proxy-raw prerouting { type filter hook prerouting priority -300 ; }",
        "add chain inet istio-proxy-raw output { type filter hook output priority -300 ; }",
    ):
        assert declaration in text


def test_every_rule_counts() -> None:
    ruleset = nft("-m", "TPROXY", "-b", "*", "--redirect-dns", "--capture-all-dns", "--ipv6", "-i", "*")
    rules = [line for line in lines(ruleset) if " rule " in line]
    assert rules and all(" counter " in line for line in rules)


def test_tproxy_and_ipv6_carry_what_lies_outside_nftables() -> None:
    assert nft("-m", "TPROXY", "-t", "7", "-r", "70", "-b", "*").tproxy == TproxyRoute(7, 70)
    assert nft().tproxy is None
    # istio-iptables adds the policy route only when TPROXY captures some inbound port.
    assert nft("-m", "TPROXY").tproxy is None
    assert nft("--ipv6").ipv6_passthrough_address
    assert not nft().ipv6_passthrough_address


def test_ipv6_rules_only_when_the_pod_has_ipv6() -> None:
    assert not any("ip6 " in line for line in lines(nft("-i", "2001:db8::/32")))
    assert (
        "add rule inet istio-proxy-nat istio-output ip6 daddr 2001:db8::/32 counter jump istio-redirect"
        in lines(nft("-i", "2001:db8::/32", "--ipv6"))
    )


def test_ipv6_dns_servers_on_an_ipv4_only_pod_get_no_jump_to_an_empty_chain() -> None:
    # Istio's nft mode jumps to istio-output-dns (nat) and istio-inbound (raw) here although both
    # only got IPv6 rules, which it drops: nft refuses the whole transaction.
    ruleset = nft("--redirect-dns", "--dns-servers-v6", "fd00::10")
    text = ruleset.text()
    assert "jump istio-output-dns" not in nat_text(ruleset)
    assert "add rule inet istio-proxy-raw prerouting" not in text
    assert "fd00::10" not in text
    # What is left is the iptables mode's IPv4 ruleset: the proxy's DNS flows get their zones.
    assert (
        "add rule inet istio-proxy-raw istio-output-dns udp dport 53 meta skuid 1337 counter ct zone set 1"
        in text
    )
    iptables = render(
        parse_flags(["-b", "", "-i", "", "--redirect-dns", "--dns-servers-v6", "fd00::10"])
    ).iptables
    assert "-j ISTIO_OUTPUT_DNS" in iptables and "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS" not in iptables


def nat_text(ruleset: NftRuleset) -> str:
    table = ruleset.table(TableName.NAT)
    assert table is not None
    return "\n".join(table.lines())


def test_ipv6_dns_servers_are_captured_on_a_dual_stack_pod() -> None:
    text = nft("--redirect-dns", "--dns-servers-v6", "fd00::10", "--ipv6").text()
    assert "add rule inet istio-proxy-nat istio-output counter jump istio-output-dns" in text
    assert "ip6 daddr fd00::10/128 udp dport 53 counter redirect to :15053" in text
    assert "add rule inet istio-proxy-raw prerouting counter jump istio-inbound" in text


@pytest.mark.parametrize("name", ["counter", "return", "tcp", "meta", "timeout", "auto-merge", "ip6"])
def test_interface_names_nft_reads_as_keywords_are_quoted(name: str) -> None:
    text = nft("-c", name, "-k", name).text()
    assert f'iifname "{name}" counter return' in text
    assert f'oifname "{name}" counter return' in text


@pytest.mark.parametrize("name", ["eth0", "not-istio-nic", "ens3.100", "veth_a"])
def test_other_interface_names_are_bare_as_istio_writes_them(name: str) -> None:
    assert f"iifname {name} counter return" in nft("-c", name).text()


def test_group_names_nft_reads_as_keywords_are_quoted() -> None:
    text = nft("--owner-groups-exclude", "counter,java,0").text()
    assert 'skgid "counter" counter return' in text
    assert "skgid java counter return" in text
    assert "skgid 0 counter return" in text


def test_keyword_list_holds_the_words_nft_refused_bare_on_this_project() -> None:
    # Each was seen failing bare with nft 1.0.6 (syntax error or wrong type).
    assert {"counter", "return", "meta", "tcp", "timeout", "auto-merge"} <= NFT_KEYWORDS
    assert Name("eth0").text() == "eth0"


def test_included_owner_groups_chain_while_one_rule_holds_them() -> None:
    groups = ",".join(str(1000 + i) for i in range(MAX_CHAINED_GROUPS))
    rule = next(line for line in lines(nft("--owner-groups-include", groups)) if "skgid != 1000" in line)
    assert rule.count("skgid != ") == MAX_CHAINED_GROUPS
    assert rule.endswith("skgid != 1062 counter return")


def test_more_included_owner_groups_than_one_rule_holds_become_a_set() -> None:
    # 64 chained matches are 130 expressions: the kernel refuses a rule of more than 128.
    groups = ",".join(str(1000 + i) for i in range(MAX_CHAINED_GROUPS + 1))
    rule = next(line for line in lines(nft("--owner-groups-include", groups)) if "skgid != {" in line)
    assert rule == (
        "add rule inet istio-proxy-nat istio-output skgid != { "
        + ", ".join(str(1000 + i) for i in range(MAX_CHAINED_GROUPS + 1))
        + " } counter return"
    )


def test_a_port_with_a_leading_zero_is_refused() -> None:
    # nft (and iptables-restore) read `010` as octal 8, Istio's route code as decimal 10.
    with pytest.raises(SpecError, match="leading zeros"):
        nft("-b", "010")


def test_port_ranges_are_written_in_nft_spelling_either_way() -> None:
    for spelled in ("8000:8010", "8000-8010"):
        text = nft("-b", spelled, "-o", spelled, "-e", spelled, "--redirect-dns", "--capture-all-dns").text()
        assert "tcp dport 8000-8010 counter jump istio-in-redirect" in text
        assert "udp dport 8000-8010 counter return" in text
        assert "tcp dport != { 53, 8000-8010 }" in text
    assert "tcp dport 0-80 counter" in nft("-b", ":80").text()
    assert "tcp dport 80-65535 counter" in nft("-b", "80:").text()


def test_interface_wildcards_are_written_in_nft_spelling() -> None:
    text = nft("-c", "eth+", "-k", "veth+").text()
    assert 'iifname "eth*" counter return' in text
    assert 'oifname "eth*" counter return' in text
    assert 'iifname "veth*" counter return' in text


def test_repeated_items_make_one_rule_each() -> None:
    text = nft("-b", "80,80", "-o", "15020,15020").text()
    assert text.count("tcp dport 80 counter jump istio-in-redirect") == 2
    assert text.count("udp dport 15020 counter return") == 2


def test_host_loopback_cidr_is_written_as_given() -> None:
    text = nft("--host-ipv4-loopback-cidr", "127.0.0.1/8").text()
    assert "ip daddr != 127.0.0.1/8" in text
    assert "add rule inet istio-proxy-nat istio-output ip daddr 127.0.0.1/8 counter return" in text


def test_insert_past_a_chains_end_appends() -> None:
    # TPROXY without inbound ports: the inserts into istio-inbound find it empty or short.
    mangle = nft("-m", "TPROXY").table(TableName.MANGLE)
    assert mangle is not None
    inbound = [rule for rule in mangle.rules if rule.chain is ChainName.INBOUND]
    assert [rule.index for rule in inbound] == [None, None, None]


FLAG_CHOICES: dict[str, st.SearchStrategy[list[str]]] = {
    "mode": st.sampled_from([[], ["-m", "TPROXY"], ["-m", "REDIRECT"]]),
    "inbound": st.sampled_from(
        [["-b", ""], ["-b", "*"], ["-b", "80,8080"], ["-b", "*", "-d", "15020,15021"]]
    ),
    "outbound": st.sampled_from(
        [["-i", ""], ["-i", "*"], ["-i", "10.0.0.0/8,fd00::/8"], ["-i", "127.0.0.1/32"], ["-i", "fd00::/8"]]
    ),
    "exclude": st.sampled_from([[], ["-x", "10.1.0.0/16,fd01::/16"], ["-o", "3306"], ["-q", "8443"]]),
    "dns": st.sampled_from(
        [
            [],
            ["--redirect-dns"],
            ["--redirect-dns", "--capture-all-dns"],
            ["--redirect-dns", "--dns-servers-v4", "10.96.0.10"],
            ["--redirect-dns", "--dns-servers-v6", "fd00::10"],
            ["--redirect-dns", "--dns-servers-v4", "10.96.0.10", "--dns-servers-v6", "fd00::10"],
        ]
    ),
    "ipv6": st.sampled_from([[], ["--ipv6"]]),
    "groups": st.sampled_from(
        [
            [],
            ["--owner-groups-include", "java,202"],
            ["--owner-groups-exclude", "888"],
            ["--owner-groups-include", ""],
        ]
    ),
    "nics": st.sampled_from([[], ["-c", "eth1"], ["-k", "eth0,eth1"], ["-c", "counter", "-k", "tcp"]]),
    "ids": st.sampled_from([[], ["-u", "3,4", "-g", "1,2"]]),
    "invalid": st.sampled_from([[], ["--drop-invalid"]]),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries(FLAG_CHOICES))
def test_every_jump_targets_a_chain_the_table_creates(choice: dict[str, list[str]]) -> None:
    ruleset = render_nftables(parse_flags([arg for part in choice.values() for arg in part]))
    for table in ruleset.tables:
        created = {chain.name for chain in table.chains}
        assert {rule.chain for rule in table.rules} == created
        for rule in table.rules:
            target = rule.jump_target()
            assert target is None or target in created
        per_chain: dict[ChainName, int] = {}
        for rule in table.rules:
            assert rule.index is None or rule.index < per_chain.get(rule.chain, 0)
            per_chain[rule.chain] = per_chain.get(rule.chain, 0) + 1
