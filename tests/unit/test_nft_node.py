"""The nftables node side's pure parts: which listed objects are ours, how two listings compare,
and the transactions (create-only, replace, restore)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from istio_pod_network_controller.node.backend import Family
from istio_pod_network_controller.node.errors import ApplyError
from istio_pod_network_controller.node.nft import (
    OUR_TABLES,
    NftApplier,
    NftPlan,
    Owned,
    create_transaction,
    describe_difference,
    replace_transaction,
    restore_transaction,
)
from istio_pod_network_controller.render.nftables import render_nftables
from istio_pod_network_controller.spec import parse_flags

SIDECAR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]


def plan(*extra: str) -> NftPlan:
    return NftPlan.of(render_nftables(parse_flags([*SIDECAR, *extra])))


def rule(table: str, chain: str, *expr: dict[str, Any], handle: int = 1, packets: int = 0) -> dict[str, Any]:
    body = {"family": "inet", "table": table, "chain": chain, "handle": handle}
    return {"rule": {**body, "expr": [*expr, {"counter": {"packets": packets, "bytes": packets * 60}}]}}


def listing(*objects: dict[str, Any]) -> str:
    return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}, *objects]})


NAT = {"table": {"family": "inet", "name": "istio-proxy-nat", "handle": 3}}
OUTPUT = {"chain": {"family": "inet", "table": "istio-proxy-nat", "name": "istio-output", "handle": 2}}
OTHERS = {"table": {"family": "inet", "name": "cni-firewall", "handle": 9}}
OTHERS_RULE = rule("cni-firewall", "input", {"accept": None})
IP_NAT = {"table": {"family": "ip", "name": "istio-proxy-nat", "handle": 4}}
RETURN = {"return": None}
REDIRECT = {"jump": {"target": "istio-redirect"}}


def test_only_our_inet_tables_count_as_ours() -> None:
    owned = Owned.from_listing(
        listing(NAT, OUTPUT, OTHERS, OTHERS_RULE, IP_NAT, rule("istio-proxy-nat", "istio-output", RETURN))
    )
    assert [item.kind for item in owned.items] == ["table", "chain", "rule"]
    assert owned.tables() == {"istio-proxy-nat"}


def test_handles_and_counter_values_do_not_make_a_difference() -> None:
    one = Owned.from_listing(
        listing(NAT, OUTPUT, rule("istio-proxy-nat", "istio-output", RETURN, handle=5, packets=9))
    )
    two = Owned.from_listing(listing(NAT, OUTPUT, rule("istio-proxy-nat", "istio-output", RETURN, handle=7)))
    assert one.same_rules(two)


def test_rule_order_within_a_chain_makes_a_difference() -> None:
    first = rule("istio-proxy-nat", "istio-output", RETURN)
    second = rule("istio-proxy-nat", "istio-output", REDIRECT)
    one = Owned.from_listing(listing(NAT, OUTPUT, first, second))
    two = Owned.from_listing(listing(NAT, OUTPUT, second, first))
    assert not one.same_rules(two)
    assert "reordered" in describe_difference(one, two)


def test_a_missing_rule_is_described_by_its_chain() -> None:
    want = Owned.from_listing(listing(NAT, OUTPUT, rule("istio-proxy-nat", "istio-output", RETURN)))
    got = Owned.from_listing(listing(NAT, OUTPUT))
    assert (
        describe_difference(want, got)
        == "istio-proxy-nat istio-output: 0 rules instead of 1 (1 missing, 0 unexpected)"
    )


@pytest.mark.parametrize("text", ["", "[]", '{"nftables": 3}', "{not json"])
def test_a_listing_that_is_not_nfts_json_is_a_read_error(text: str) -> None:
    with pytest.raises(ApplyError) as caught:
        Owned.from_listing(text)
    assert caught.value.step == "read"


def test_counters_survive_a_restore() -> None:
    owned = Owned.from_listing(
        listing(NAT, OUTPUT, rule("istio-proxy-nat", "istio-output", RETURN, packets=3))
    )
    commands = json.loads(restore_transaction(owned))["nftables"]
    assert commands[: 2 * len(OUR_TABLES)] == [
        {op: {"table": {"family": "inet", "name": name}}} for name in OUR_TABLES for op in ("add", "delete")
    ]
    added = commands[2 * len(OUR_TABLES) :]
    assert [next(iter(c["add"])) for c in added] == ["table", "chain", "rule"]
    assert added[2]["add"]["rule"]["expr"][-1] == {"counter": {"packets": 3, "bytes": 180}}
    assert all("handle" not in next(iter(c["add"].values())) for c in added)


def test_tproxy_families_come_from_our_tproxy_chain() -> None:
    mangle = {"table": {"family": "inet", "name": "istio-proxy-mangle"}}
    v4 = rule("istio-proxy-mangle", "istio-tproxy", {"tproxy": {"family": "ip", "port": 15006}})
    v6 = rule("istio-proxy-mangle", "istio-tproxy", {"tproxy": {"family": "ip6", "port": 15006}})
    assert Owned.from_listing(listing(mangle, v6, v4)).tproxy_families() == [Family.IPV4, Family.IPV6]
    assert Owned.from_listing(listing(NAT, OUTPUT)).tproxy_families() == []


def test_create_transaction_creates_the_plans_tables_and_deletes_nothing() -> None:
    lines = create_transaction(plan()).splitlines()
    assert lines[:1] == ["create table inet istio-proxy-nat"]
    assert "\n".join(lines[1:]) + "\n" == plan().text
    assert not any(line.startswith("delete") for line in lines)
    tproxy = create_transaction(plan("-m", "TPROXY")).splitlines()
    assert tproxy[:2] == ["create table inet istio-proxy-nat", "create table inet istio-proxy-mangle"]


def test_replace_transaction_empties_all_our_tables_then_writes_the_plan() -> None:
    text = replace_transaction(plan("-m", "TPROXY"))
    head = [line for name in OUR_TABLES for line in (f"add table inet {name}", f"delete table inet {name}")]
    assert text.splitlines()[: len(head)] == head
    assert text.endswith(plan("-m", "TPROXY").text)
    assert "cni" not in text


def test_the_plan_hash_tells_modes_and_rulesets_apart() -> None:
    assert plan().sha256() == plan().sha256()
    assert plan().sha256() != plan("-m", "TPROXY").sha256()
    assert plan().rule_count() == render_nftables(parse_flags(SIDECAR)).rule_count()


def test_the_applier_names_its_mode() -> None:
    class NoRunner:
        name = "none"

    applier = NftApplier(NoRunner())  # type: ignore[arg-type]
    assert (applier.mode, applier.backend) == ("nftables", "nftables")
    assert applier.render(parse_flags(SIDECAR)) == plan()
