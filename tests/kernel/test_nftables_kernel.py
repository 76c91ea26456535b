"""The nftables renderer in a real kernel: what ``nft -f`` of our text leaves equals what Istio's
golden text leaves, for all 28 cases, and the cases where Istio's spelling does not load load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from istio_pod_network_controller.render.nftables import MAX_CHAINED_GROUPS, render_nftables
from istio_pod_network_controller.spec import SpecError, parse_flags

from .nft_state import group_file, leftover_namespaces, load_nft, needs_root_and, try_load_nft

pytestmark = pytest.mark.kernel

VECTORS = Path(__file__).resolve().parents[1] / "conformance" / "istio-nftables"
VECTOR_FILES = sorted(VECTORS.glob("*.json"))


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    needs_root_and("nft")
    return group_file(tmp_path_factory.mktemp("etc"))


@pytest.fixture(autouse=True)
def no_leftover_namespaces() -> Iterator[None]:
    yield
    assert leftover_namespaces() == [], "a test left a network namespace behind"


def ours(*args: str) -> str:
    return render_nftables(parse_flags(["-b", "", "-i", "", *args])).text()


def rules_of(ruleset: list[dict[str, Any]], table: str, chain: str) -> list[list[Any]]:
    return [
        item["rule"]["expr"]
        for item in ruleset
        if "rule" in item and item["rule"]["table"] == table and item["rule"]["chain"] == chain
    ]


def chains_of(ruleset: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(item["chain"]["table"], item["chain"]["name"]) for item in ruleset if "chain" in item}


def test_every_vector_is_here() -> None:
    assert len(VECTOR_FILES) == 28


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_kernel_holds_the_same_ruleset_as_for_istios_golden(path: Path, groups: Path) -> None:
    vec = json.loads(path.read_text())
    expected = load_nft(vec["nftables"], groups)
    assert expected, "the golden loads into something"
    assert load_nft(render_nftables(parse_flags(vec["args"])).text(), groups) == expected


def test_inserts_land_where_the_iptables_rules_do(groups: Path) -> None:
    # nft's `insert ... index N` goes before the N-th rule: the TPROXY guards end up first.
    loaded = load_nft(ours("-m", "TPROXY", "-b", "*"), groups)
    inbound = rules_of(loaded, "istio-proxy-mangle", "istio-inbound")
    assert [json.dumps(expr) for expr in inbound[:3]] == [
        json.dumps(expr)
        for expr in rules_of(load_nft(ours("-m", "TPROXY"), groups), "istio-proxy-mangle", "istio-inbound")
    ]
    assert '"mark"' in json.dumps(inbound[0]) and "127.0.0.6" in json.dumps(inbound[1])
    assert "1338" in json.dumps(inbound[2]) and "related" in json.dumps(inbound[3])


def test_ipv6_dns_servers_on_an_ipv4_only_pod_load(groups: Path) -> None:
    loaded = load_nft(ours("--redirect-dns", "--dns-servers-v6", "fd00::10"), groups)
    assert ("istio-proxy-nat", "istio-output-dns") not in chains_of(loaded)
    assert ("istio-proxy-raw", "istio-output-dns") in chains_of(loaded)
    assert "fd00::10" not in json.dumps(loaded)


def test_names_spelled_like_nft_keywords_load(groups: Path) -> None:
    text = ours("-c", "counter", "-k", "tcp", "--owner-groups-exclude", "counter")
    loaded = load_nft(text, groups)
    prerouting = json.dumps(rules_of(loaded, "istio-proxy-nat", "prerouting"))
    assert '"counter"' in prerouting and '"tcp"' in prerouting
    # Istio writes them bare, which nft refuses.
    bare = text.replace('"counter"', "counter").replace('"tcp"', "tcp")
    assert try_load_nft(bare, groups).returncode != 0


def test_the_most_owner_groups_one_rule_holds_load_chained(groups: Path) -> None:
    listed = ",".join(str(1000 + i) for i in range(MAX_CHAINED_GROUPS))
    loaded = load_nft(ours("--owner-groups-include", listed), groups)
    assert json.dumps(loaded).count('"skgid"') >= MAX_CHAINED_GROUPS


def test_more_owner_groups_load_as_a_set(groups: Path) -> None:
    # Not consecutive, or nft stores them as one range.
    listed = [str(1000 + 2 * i) for i in range(MAX_CHAINED_GROUPS + 1)]
    text = ours("--owner-groups-include", ",".join(listed))
    matches = [
        expr["match"]
        for rule in rules_of(load_nft(text, groups), "istio-proxy-nat", "istio-output")
        for expr in rule
        if "match" in expr
        and expr["match"]["left"] == {"meta": {"key": "skgid"}}
        and expr["match"]["op"] == "!="
    ]
    sets = [m["right"]["set"] for m in matches if isinstance(m["right"], dict) and "set" in m["right"]]
    assert sets == [[int(gid) for gid in listed]]
    # Istio's one-match-per-group rule is more than the kernel takes.
    chained = " ".join(f"skgid != {gid}" for gid in listed)
    istio = text.replace("skgid != { " + ", ".join(listed) + " }", chained)
    assert istio != text
    assert "Could not process rule" in try_load_nft(istio, groups).stderr


def test_a_port_with_leading_zeros_is_refused(groups: Path) -> None:
    # nft reads `010` as octal 8 (so does iptables-restore, and Istio passes the text on, while
    # its own policy route reads it as decimal): no reading is right, so it is refused.
    with pytest.raises(SpecError, match="leading zeros"):
        ours("-b", "010")
