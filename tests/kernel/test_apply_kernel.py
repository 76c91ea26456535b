"""Applying into a real namespace with each backend: re-apply, replace, others' rules, failures.

What we pin here is the state of the kernel's tables as iptables-save shows it, before and after.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipnc_dev.iptables import iptables_command
from ipnc_dev.netlab import Netlab
from istio_pod_network_controller.node import tables
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Family, Tools
from istio_pod_network_controller.node.errors import ApplyError, LocateError
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.render import FamilyRules, Rule, Ruleset, render
from istio_pod_network_controller.spec import parse_flags

from .conftest import ruleset

pytestmark = pytest.mark.kernel

# Rules a CNI plugin or an admin might have put in a pod's namespace before us.
FOREIGN = [
    ["-t", "nat", "-N", "CNI-HOSTPORT"],
    [
        "-t",
        "nat",
        "-A",
        "CNI-HOSTPORT",
        "-p",
        "tcp",
        "--dport",
        "30080",
        "-j",
        "DNAT",
        "--to-destination",
        ":80",
    ],
    ["-t", "nat", "-A", "PREROUTING", "-j", "CNI-HOSTPORT"],
    ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777", "-j", "RETURN"],
    ["-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "7777", "-j", "MARK", "--set-mark", "7"],
    ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7778", "-j", "DROP"],
]


def save(ns: Netns, tools: Tools, family: Family = Family.IPV4) -> str:
    """iptables-save without its timestamp comments."""
    done = ns.run(tools.save_argv(family))
    assert done.ok, done.reason()
    return "".join(line + "\n" for line in done.stdout.splitlines() if not line.startswith("#"))


def ruleset_lines(ns: Netns, tools: Tools, family: Family = Family.IPV4) -> list[str]:
    """Every chain and rule, per table, leaving out tables that hold nothing (a failed legacy
    restore may leave an empty table loaded, which changes no behaviour)."""
    state = tables.parse_save(save(ns, tools, family))
    out: list[str] = []
    for table, chains in sorted(state.tables.items()):
        if all(c.policy is not None and not c.rules for c in chains):
            continue
        for chain in chains:
            out.append(f"{table} :{chain.name} {chain.policy or '-'}")
            out += [f"{table} -A {chain.name} {rule}" for rule in chain.rules]
    return out


def ours(ns: Netns, tools: Tools, family: Family = Family.IPV4) -> list[str]:
    return sorted(tables.owned(tables.parse_save(save(ns, tools, family))).rule_lines())


def add_foreign_rules(ns: Netns, tools: Tools) -> None:
    for family in Family:
        for rule in FOREIGN:
            done = ns.run([iptables_command(tools, family), "-w", *rule])
            assert done.ok, done.reason()


@pytest.fixture
def pod_ns(lab: Netlab) -> Iterator[Netns]:
    """A namespace with no links but lo, so no packet moves a policy counter between two saves."""
    with Netns(lab.add_netns("pod")) as ns:
        yield ns


def test_same_spec_twice_gives_a_byte_identical_ruleset(pod_ns: Netns, backend_tools: Tools) -> None:
    applier = Applier(backend_tools)
    first = applier.apply(pod_ns, ruleset("--ipv6", "--redirect-dns", "--capture-all-dns"))
    after_first = (save(pod_ns, backend_tools), save(pod_ns, backend_tools, Family.IPV6))
    second = applier.apply(pod_ns, ruleset("--ipv6", "--redirect-dns", "--capture-all-dns"))
    assert (first.changed, second.changed) == (True, False)
    assert (save(pod_ns, backend_tools), save(pod_ns, backend_tools, Family.IPV6)) == after_first


def test_reapplying_after_a_different_spec_restores_the_same_bytes(
    pod_ns: Netns, backend_tools: Tools
) -> None:
    add_foreign_rules(pod_ns, backend_tools)
    applier = Applier(backend_tools)
    applier.apply(pod_ns, ruleset("--ipv6"))
    before = save(pod_ns, backend_tools), save(pod_ns, backend_tools, Family.IPV6)
    applier.apply(pod_ns, ruleset("--ipv6", "-m", "TPROXY", "--drop-invalid", "-c", "eth9"))
    applier.apply(pod_ns, ruleset("--ipv6"))
    # mangle now exists (TPROXY loaded it); compare the tables the first apply had.
    assert ruleset_lines(pod_ns, backend_tools) == _lines(before[0])
    assert ruleset_lines(pod_ns, backend_tools, Family.IPV6) == _lines(before[1])


def _lines(text: str) -> list[str]:
    state = tables.parse_save(text)
    out: list[str] = []
    for table, chains in sorted(state.tables.items()):
        if all(c.policy is not None and not c.rules for c in chains):
            continue
        for chain in chains:
            out.append(f"{table} :{chain.name} {chain.policy or '-'}")
            out += [f"{table} -A {chain.name} {rule}" for rule in chain.rules]
    return out


def test_changed_spec_leaves_no_rule_of_the_old_one(lab: Netlab, backend_tools: Tools) -> None:
    applier = Applier(backend_tools)
    big = ruleset(
        "--ipv6", "-m", "TPROXY", "--drop-invalid", "--redirect-dns", "--capture-all-dns", "-c", "eth9"
    )
    small = ruleset("-b", "8080", "-i", "10.0.0.0/8")
    with Netns(lab.add_pod("reused").path) as reused, Netns(lab.add_pod("fresh").path) as fresh:
        applier.apply(reused, big)
        assert any("ISTIO_DROP" in line for line in ours(reused, backend_tools))
        applier.apply(reused, small)
        applier.apply(fresh, small)
        for family in Family:
            assert ours(reused, backend_tools, family) == ours(fresh, backend_tools, family)
        assert ours(reused, backend_tools, Family.IPV6) == []
        assert "ISTIO" not in save(reused, backend_tools, Family.IPV6)
        assert "133" not in reused.run(["ip", "rule", "show"]).stdout


def test_rules_of_others_are_left_alone(pod_ns: Netns, backend_tools: Tools) -> None:
    empty = save(pod_ns, backend_tools), save(pod_ns, backend_tools, Family.IPV6)
    add_foreign_rules(pod_ns, backend_tools)
    theirs = ruleset_lines(pod_ns, backend_tools), ruleset_lines(pod_ns, backend_tools, Family.IPV6)
    applier = Applier(backend_tools)
    applier.apply(pod_ns, ruleset("--ipv6", "-m", "TPROXY", "--drop-invalid"))
    applier.apply(pod_ns, ruleset("--ipv6", "-c", "eth9", "-k", "eth8"))
    for family, expected in zip(Family, theirs, strict=True):
        now = ruleset_lines(pod_ns, backend_tools, family)
        kept = [line for line in now if "ISTIO" not in line and tables.TAG not in line]
        assert kept == expected
    # Removing our rules gives back exactly what the others had.
    applier.apply(pod_ns, Ruleset(FamilyRules(), FamilyRules()))
    assert ruleset_lines(pod_ns, backend_tools) == theirs[0]
    assert ruleset_lines(pod_ns, backend_tools, Family.IPV6) == theirs[1]
    assert empty != (save(pod_ns, backend_tools), save(pod_ns, backend_tools, Family.IPV6))


def _break_nat(rules: FamilyRules) -> FamilyRules:
    """Rules that the kernel refuses in the nat table only (after mangle was committed): the
    last jump to ISTIO_REDIRECT goes to a chain that does not exist."""
    assert {"mangle", "nat"} <= {rule.table for rule in rules.rules}
    jump = Rule("nat", "ISTIO_OUTPUT", (), "ISTIO_REDIRECT")
    assert jump in rules.rules
    broken = tuple(r._replace(jump="ISTIO_NO_SUCH_CHAIN") if r == jump else r for r in rules.rules)
    return FamilyRules(rules.chains, broken)


def test_failed_restore_leaves_the_previous_ruleset_intact(pod_ns: Netns, backend_tools: Tools) -> None:
    add_foreign_rules(pod_ns, backend_tools)
    applier = Applier(backend_tools)
    applier.apply(pod_ns, ruleset("--ipv6"))
    before = ruleset_lines(pod_ns, backend_tools), ruleset_lines(pod_ns, backend_tools, Family.IPV6)
    good = ruleset("--ipv6", "--drop-invalid")
    broken = dataclasses.replace(good, v4=_break_nat(good.v4))
    with pytest.raises(ApplyError) as failed:
        applier.apply(pod_ns, broken, fresh=False)  # known to hold our rules: read first, then restore
    assert failed.value.step == "iptables-restore"
    assert "ISTIO_NO_SUCH_CHAIN" in failed.value.reason or "line" in failed.value.reason
    assert "previous rules restored" in failed.value.reason
    assert (ruleset_lines(pod_ns, backend_tools), ruleset_lines(pod_ns, backend_tools, Family.IPV6)) == before


def test_failed_ipv6_restore_rolls_back_ipv4(pod_ns: Netns, backend_tools: Tools) -> None:
    applier = Applier(backend_tools)
    applier.apply(pod_ns, ruleset("--ipv6"))
    before = ruleset_lines(pod_ns, backend_tools), ruleset_lines(pod_ns, backend_tools, Family.IPV6)
    good = ruleset("--ipv6", "--drop-invalid", "-o", "9999")
    broken = dataclasses.replace(good, v6=_break_nat(good.v6))
    with pytest.raises(ApplyError) as failed:
        applier.apply(pod_ns, broken, fresh=False)
    assert failed.value.step == "ip6tables-restore"
    assert (ruleset_lines(pod_ns, backend_tools), ruleset_lines(pod_ns, backend_tools, Family.IPV6)) == before


def test_a_ruleset_creating_a_chain_we_do_not_own_is_refused_untouched(
    pod_ns: Netns, nft_tools: Tools
) -> None:
    before = save(pod_ns, nft_tools)
    bad = Ruleset.from_restore_text("* nat\n-N KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n", "")
    with pytest.raises(ApplyError) as failed:
        Applier(nft_tools).apply(pod_ns, bad)
    assert failed.value.step == "prepare"
    assert "KUBE-SERVICES" in failed.value.reason
    assert save(pod_ns, nft_tools) == before


def test_tampering_seen_at_read_back_is_an_error(pod_ns: Netns, nft_tools: Tools) -> None:
    def tamper(step: str, ns: Netns) -> None:
        if step == "verify":
            iptables = iptables_command(nft_tools, Family.IPV4)
            cmd = [iptables, "-t", "nat", "-D", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"]
            assert ns.run(cmd).ok

    with pytest.raises(ApplyError) as failed:
        Applier(nft_tools, on_step=tamper).apply(pod_ns, ruleset())
    assert failed.value.step == "verify"
    assert "missing" in failed.value.reason and "ISTIO_REDIRECT" in failed.value.reason
    assert ours(pod_ns, nft_tools) == []  # rolled back to the (empty) state before


def test_namespace_deleted_mid_apply_gives_a_clear_error(lab: Netlab, nft_tools: Tools) -> None:
    pod = lab.add_pod("doomed")

    def vanish(step: str, ns: Netns) -> None:
        if step == "restore":
            lab.remove_netns(pod.path)

    with Netns(pod.path) as ns, pytest.raises(ApplyError) as failed:
        Applier(nft_tools, on_step=vanish).apply(ns, ruleset())
    assert "vanished" in failed.value.reason
    with pytest.raises(LocateError):
        Netns(pod.path)


def test_pod_process_exiting_mid_apply_gives_a_clear_error(lab: Netlab, nft_tools: Tools) -> None:
    sandbox = lab.sleeper(lab.add_netns("sandbox"))
    lab.remove_netns(f"{lab.prefix}-sandbox")  # only the process keeps the namespace now

    def exit_pod(step: str, ns: Netns) -> None:
        if step == "restore":
            sandbox.stop()

    with Netns(f"/proc/{sandbox.pid}/ns/net") as ns, pytest.raises(ApplyError) as failed:
        Applier(nft_tools, on_step=exit_pod).apply(ns, ruleset())
    assert "vanished" in failed.value.reason


def test_an_agent_restart_meets_its_own_rules_and_keeps_them(pod_ns: Netns, backend_tools: Tools) -> None:
    rules = ruleset("--ipv6", "--redirect-dns", "--capture-all-dns")
    Applier(backend_tools).apply(pod_ns, rules)
    before = save(pod_ns, backend_tools), save(pod_ns, backend_tools, Family.IPV6)
    # A new applier has never seen this namespace: its create-only write fails on our chains,
    # changes nothing, and the read-first path finds the rules already right.
    result = Applier(backend_tools).apply(pod_ns, rules)
    assert result.changed is False
    assert (save(pod_ns, backend_tools), save(pod_ns, backend_tools, Family.IPV6)) == before


def test_an_agent_restart_replaces_an_old_spec(lab: Netlab, backend_tools: Tools) -> None:
    with Netns(lab.add_pod("reused").path) as reused, Netns(lab.add_pod("fresh").path) as fresh:
        Applier(backend_tools).apply(reused, ruleset("--ipv6", "--drop-invalid", "-c", "eth9"))
        Applier(backend_tools).apply(reused, ruleset("-o", "9999"))
        Applier(backend_tools).apply(fresh, ruleset("-o", "9999"))
        for family in Family:
            assert ours(reused, backend_tools, family) == ours(fresh, backend_tools, family)


def test_a_stray_chain_in_a_later_table_is_replaced_not_duplicated(
    pod_ns: Netns, backend_tools: Tools
) -> None:
    # Our raw chain exists but not our nat chains: the create-only write commits nat, fails on raw,
    # and the read-first path must finish the job from there.
    iptables = iptables_command(backend_tools, Family.IPV4)
    assert pod_ns.run([iptables, "-w", "-t", "raw", "-N", "ISTIO_OUTPUT_DNS"]).ok
    rules = ruleset("--redirect-dns", "--capture-all-dns")
    Applier(backend_tools).apply(pod_ns, rules)
    reference = Applier(backend_tools).expected.compute(backend_tools, Family.IPV4, tables.desired(rules.v4))
    assert ours(pod_ns, backend_tools) == sorted(reference.rule_lines())


def test_stale_ipv6_rules_are_removed_on_first_visit(pod_ns: Netns, backend_tools: Tools) -> None:
    Applier(backend_tools).apply(pod_ns, ruleset("--ipv6"))
    assert ours(pod_ns, backend_tools, Family.IPV6) != []
    Applier(backend_tools).apply(pod_ns, ruleset("-o", "9999"))
    assert ours(pod_ns, backend_tools, Family.IPV6) == []


TPROXY_VECTORS = sorted(
    path
    for path in (Path(__file__).resolve().parents[1] / "conformance" / "istio-nftables").glob("*.json")
    if "TPROXY" in json.loads(path.read_text())["args"]
)


def kernel_state(ns: Netns, tools: Tools) -> tuple[str, ...]:
    """Both families' tables, the policy routes, and (nf_tables backend) every object's handle:
    a rewrite of an unchanged rule gives it a new handle."""
    state = [save(ns, tools), save(ns, tools, Family.IPV6)]
    state += [ns.run(["ip", flag, "rule", "show"]).stdout for flag in ("-4", "-6")]
    state += [ns.run(["ip", flag, "route", "show", "table", "all"]).stdout for flag in ("-4", "-6")]
    if tools.backend.value == "nft":
        listed = ns.run(["nft", "-a", "list", "ruleset"])
        assert listed.ok, listed.reason()
        state.append(re.sub(r"counter packets \d+ bytes \d+", "counter", listed.stdout))
    return tuple(state)


@pytest.mark.parametrize("path", TPROXY_VECTORS, ids=lambda p: p.stem)
@pytest.mark.parametrize("fresh", [True, False], ids=["believed-new", "re-check"])
def test_a_new_process_reapplying_a_tproxy_ruleset_writes_nothing(
    lab: Netlab, backend_tools: Tools, path: Path, fresh: bool
) -> None:
    args = json.loads(path.read_text())["args"]
    rules = render(parse_flags(args))
    with Netns(lab.add_netns("tproxy")) as ns:  # lo only: no packet moves a counter meanwhile
        assert Applier(backend_tools).apply(ns, rules).changed
        before = kernel_state(ns, backend_tools)
        # Each applier stands for a new agent process: nothing cached, nothing remembered.
        again = Applier(backend_tools).apply(ns, rules, fresh=fresh)
        assert (again.changed, again.replaced) == (False, "")
        assert kernel_state(ns, backend_tools) == before


def test_there_are_tproxy_vectors() -> None:
    assert len(TPROXY_VECTORS) >= 4
