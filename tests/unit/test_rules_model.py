"""The rule model: rendered rules print the restore text Istio expects, that text reads back into
the very same rules, and the ruleset's SHA-256 (kept in every programmed pod's mark) keeps the
value it had when rulesets were held as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from istio_pod_network_controller.render import FamilyRules, Rule, Ruleset, RulesetFormatError, render
from istio_pod_network_controller.spec import RedirectSpec, SpecError, parse_flags, spec_from_pod

from .test_canonical import flags, switches

CONFORMANCE = Path(__file__).resolve().parents[3] / "shared" / "conformance"
SIDECAR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
           "-d", "15090,15021,15020"]  # fmt: skip
EVERYTHING = [*SIDECAR, "--ipv6", "-m", "TPROXY", "--redirect-dns", "--capture-all-dns", "--drop-invalid",
              "-c", "eth9", "-k", "eth8"]  # fmt: skip


def _vectors() -> list[Path]:
    return sorted(CONFORMANCE.glob("istio-*/*.json"))


def _spec(vector: dict[str, Any]) -> RedirectSpec:
    return spec_from_pod(vector["pod"]) if "pod" in vector else parse_flags(vector["args"])


def test_the_vectors_are_there() -> None:
    assert len(_vectors()) >= 20, f"conformance vectors not found under {CONFORMANCE}"


@pytest.mark.parametrize("path", _vectors(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_rules_to_text_to_rules_is_the_identity_for_every_vector(path: Path) -> None:
    ruleset = render(_spec(json.loads(path.read_text())))
    for rules in (ruleset.v4, ruleset.v6):
        text = rules.restore_text()
        again = FamilyRules.from_restore_text(text)
        assert again == rules
        assert again.restore_text() == text
    rebuilt = Ruleset.from_restore_text(
        ruleset.iptables,
        ruleset.ip6tables,
        tproxy=ruleset.tproxy,
        ipv6_passthrough_address=ruleset.ipv6_passthrough_address,
    )
    assert rebuilt == ruleset
    assert rebuilt.sha256() == ruleset.sha256()


@pytest.mark.parametrize("path", _vectors(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_istios_expected_text_reads_as_our_rules(path: Path) -> None:
    vector = json.loads(path.read_text())
    ruleset = render(_spec(vector))
    assert FamilyRules.from_restore_text(vector["iptables"]) == ruleset.v4
    assert FamilyRules.from_restore_text(vector["ip6tables"]) == ruleset.v6


@settings(max_examples=200, deadline=None)
@given(flags, switches)
def test_any_rendered_ruleset_reads_back_as_itself(values: dict[str, str], on: set[str]) -> None:
    try:
        spec = parse_flags([f"{k}={v}" for k, v in values.items()] + sorted(on))
        ruleset = render(spec)  # refuses what iptables mode cannot write (50+ owner groups)
    except SpecError:
        return
    for rules in (ruleset.v4, ruleset.v6):
        assert FamilyRules.from_restore_text(rules.restore_text()) == rules
    lines = (ruleset.iptables + ruleset.ip6tables).splitlines()
    assert ruleset.rule_count() == sum(line.startswith(("-A ", "-I ")) for line in lines)


@pytest.mark.parametrize(
    ("argv", "sha256"),
    [
        (SIDECAR, "89e9c92ad4d6709f2f1bd63385b7098e5bc50e0c90efd1b4b5790557f3304a36"),
        (EVERYTHING, "83a53b5486469fc2aedda9bf3a00145cb915e60fe63f673d415eb022f626c21a"),
    ],
    ids=["sidecar", "tproxy-ipv6-dns"],
)
def test_the_sha256_in_pods_marks_keeps_its_value(argv: list[str], sha256: str) -> None:
    # Values from when rulesets were held as text: a change would make every agent upgrade
    # re-program and re-mark every pod.
    assert render(parse_flags(argv)).sha256() == sha256


def test_rules_hold_the_target_apart_from_the_match() -> None:
    ruleset = render(parse_flags(EVERYTHING))
    tproxy = next(r for r in ruleset.v4.rules if r.jump == "TPROXY")
    assert tproxy.table == "mangle" and tproxy.chain == "ISTIO_TPROXY"
    assert tproxy.match == ("!", "-d", "127.0.0.1/32", "-p", "tcp")
    assert tproxy.options == ("--tproxy-mark", "1337/0xffffffff", "--on-port", "15006")
    inserted = [r for r in ruleset.v4.rules if r.position is not None]
    assert [(r.table, r.chain, r.position) for r in inserted] == [
        ("mangle", "ISTIO_INBOUND", 1),
        ("mangle", "ISTIO_INBOUND", 2),
        ("mangle", "ISTIO_INBOUND", 3),
        ("nat", "PREROUTING", 1),  # -k eth8: not inbound, then its outbound capture
        ("nat", "PREROUTING", 1),
    ]


def test_chains_are_created_per_table_filled_ones_first_then_those_only_jumped_to() -> None:
    rules = FamilyRules.of(
        [
            Rule("nat", "OUTPUT", (), "ISTIO_OUTPUT"),
            Rule("raw", "OUTPUT", (), "ISTIO_OUTPUT_DNS"),
            Rule("nat", "ISTIO_OUTPUT", ("-d", "10.0.0.0/8"), "ISTIO_REDIRECT"),
            Rule("nat", "ISTIO_REDIRECT", ("-p", "tcp"), "REDIRECT", ("--to-ports", "15001")),
            Rule("mangle", "PREROUTING", (), "ACCEPT"),
        ]
    )
    assert rules.chains == (("nat", "ISTIO_OUTPUT"), ("nat", "ISTIO_REDIRECT"), ("raw", "ISTIO_OUTPUT_DNS"))
    assert rules.restore_text().splitlines() == [
        "* mangle",
        "-A PREROUTING -j ACCEPT",
        "COMMIT",
        "* nat",
        "-N ISTIO_OUTPUT",
        "-N ISTIO_REDIRECT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "COMMIT",
        "* raw",
        "-N ISTIO_OUTPUT_DNS",
        "-A OUTPUT -j ISTIO_OUTPUT_DNS",
        "COMMIT",
    ]


def test_a_marker_comment_is_printed_right_after_the_chain() -> None:
    rule = Rule("nat", "PREROUTING", ("-i", "eth1"), "RETURN", position=2, comment="mark-me")
    assert rule.line() == "-I PREROUTING 2 -m comment --comment mark-me -i eth1 -j RETURN"
    assert rule.argv() == ("-I", "PREROUTING", "2", "-m", "comment", "--comment", "mark-me", "-i", "eth1",
                           "-j", "RETURN")  # fmt: skip


def test_no_rules_print_no_text() -> None:
    assert FamilyRules().restore_text() == ""
    assert render(parse_flags(SIDECAR)).ip6tables == ""


@pytest.mark.parametrize(
    "text",
    [
        "* nat\n-F OUTPUT\nCOMMIT\n",
        "* nat\n-A OUTPUT -p tcp\nCOMMIT\n",
        "* nat\n-A OUTPUT -j\nCOMMIT\n",
        "* nat\n-A OUTPUT -o 'eth0' -j RETURN\nCOMMIT\n",
        "* nat\n-A OUTPUT -j RETURN\n",
        "* nat\n* raw\nCOMMIT\n",
        "* nat\n-A OUTPUT\0 -j RETURN\nCOMMIT\n",
    ],
)
def test_text_in_forms_the_renderer_never_writes_is_refused(text: str) -> None:
    with pytest.raises(RulesetFormatError):
        FamilyRules.from_restore_text(text)
