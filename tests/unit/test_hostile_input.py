"""Property: whatever a pod's annotations hold, the ruleset is made only of lines of our grammar,
or the pod is rejected. A value can never add, end or change a rule."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import SpecError, spec_from_pod
from istio_pod_network_controller.spec.pod import TRAFFIC_ANNOTATIONS

CHAIN = r"(?:PREROUTING|OUTPUT|ISTIO_[A-Z_]+)"
# A token of a rule: an option, a negation, a target or keyword, a number list, an address or
# CIDR, or an interface/group name. No spaces, quotes, semicolons or newlines can appear.
TOKEN = (
    r"(?:-{1,2}[a-z][a-z-]*|!|[A-Z][A-Z_,]*|[0-9]+(?:,[0-9]+)*|[0-9]+/0xffffffff"
    r"|[0-9a-fA-F.:]+/[0-9]{1,3}|[a-zA-Z_][a-zA-Z0-9_.-]{0,31})"
)
LINE = re.compile(
    rf"\* (?:nat|mangle|raw)|COMMIT|-N ISTIO_[A-Z_]+|-A {CHAIN}(?: {TOKEN})+|-I {CHAIN} [0-9]+(?: {TOKEN})+"
)

fragments = st.sampled_from(
    ["80", "15001", "*", ",", " ", "\n", "\r", "\t", "-A OUTPUT -j DROP", "COMMIT", "*nat", ";", "$(id)",
     "10.0.0.0/8", "fd00::/8", "::1", "127.0.0.1/32", "eth0", "-j", "ACCEPT", "\"", "'", "\\", "0", "65536",
     "é", "\x00", "a" * 16, "/33", "!", "--dport", "REDIRECT", "TPROXY"]
)  # fmt: skip
hostile = st.one_of(
    st.lists(fragments, max_size=8).map("".join),
    st.text(max_size=40),
)


def pod_with(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": annotations},
        "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
    }


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(TRAFFIC_ANNOTATIONS), hostile, min_size=1, max_size=4))
def test_every_rendered_line_matches_the_rule_grammar_or_input_is_rejected(
    annotations: dict[str, str],
) -> None:
    try:
        spec = spec_from_pod(pod_with(annotations))
    except SpecError as exc:
        assert "\n" not in str(exc)
        return
    ruleset = render(spec)
    for text in (ruleset.iptables, ruleset.ip6tables):
        for line in text.splitlines():
            assert LINE.fullmatch(line), f"line outside the grammar: {line!r} from {annotations!r}"
        # Exactly one COMMIT per table header: nothing can close a table early.
        lines = text.splitlines()
        assert lines.count("COMMIT") == sum(line.startswith("* ") for line in lines)


def test_grammar_rejects_an_injected_rule() -> None:
    assert not LINE.fullmatch("-A ISTIO_OUTPUT -d 10.0.0.0/8\n-A OUTPUT -j DROP")
    assert not LINE.fullmatch("-A ISTIO_OUTPUT -o eth0;reboot -j RETURN")
