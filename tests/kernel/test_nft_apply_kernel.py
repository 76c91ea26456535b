"""NftApplier in real namespaces: re-apply writes nothing, drift is repaired, others' tables are
left alone, a failed transaction or verification leaves the previous state, and both ways of
running nft (libnftables in process, the nft binary) leave the same tables."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ipnc_dev.netlab import Netlab
from istio_pod_network_controller.node.errors import ApplyError, NodeError
from istio_pod_network_controller.node.netns import Completed, Netns
from istio_pod_network_controller.node.nft import (
    LibRunner,
    NftApplier,
    NftPlan,
    ProcessRunner,
    Runner,
    Session,
)
from istio_pod_network_controller.spec import parse_flags

from .conftest import SIDECAR, _needs_root

pytestmark = pytest.mark.kernel

# A table of someone else's (a CNI plugin's, an admin's), and an iptables-nft rule.
FOREIGN = """table inet cni-firewall {
    chain input { type filter hook input priority 0; policy accept; tcp dport 7777 counter drop; }
    chain output { type nat hook output priority -100; tcp dport 7778 counter return; }
}
"""


def runners() -> list[object]:
    found: list[object] = [pytest.param(ProcessRunner, id="nft-binary")]
    try:
        LibRunner()
    except NodeError:
        return found
    return [pytest.param(LibRunner, id="libnftables"), *found]


@pytest.fixture(params=runners())
def runner(request: pytest.FixtureRequest) -> Runner:
    _needs_root()
    made: Runner = request.param()
    return made


@pytest.fixture
def pod_ns(lab: Netlab) -> Iterator[Netns]:
    """lo only: no packet moves a counter between two listings."""
    with Netns(lab.add_netns("pod")) as ns:
        yield ns


def plan(*extra: str) -> NftPlan:
    return NftPlan.of(NftApplier(ProcessRunner()).render(parse_flags([*SIDECAR, *extra])).ruleset)


def listing(ns: Netns, *, handles: bool = False) -> str:
    """The whole ruleset as nft prints it; counters taken out; handles kept when asked."""
    listed = ns.run(["nft", *(["-a"] if handles else []), "list", "ruleset"])
    assert listed.ok, listed.reason()
    return re.sub(r"counter packets \d+ bytes \d+", "counter", listed.stdout)


def ours(ns: Netns) -> str:
    """Our tables only, without handles: what a namespace programmed from scratch also holds."""
    text = listing(ns)
    blocks = re.findall(r"^table inet istio-proxy-\S+ \{.*?^\}$", text, flags=re.S | re.M)
    return "\n".join(sorted(blocks))


def nft(ns: Netns, script: str) -> None:
    done = ns.run(["nft", "-f", "-"], stdin=script)
    assert done.ok, done.reason()


def test_same_spec_twice_writes_nothing_even_from_a_new_applier(pod_ns: Netns, runner: Runner) -> None:
    rules = plan("--ipv6", "-m", "TPROXY", "--redirect-dns", "--drop-invalid")
    first = NftApplier(runner).apply(pod_ns, rules)
    before = (
        listing(pod_ns, handles=True),
        pod_ns.run(["ip", "rule"]).stdout,
        pod_ns.run(["ip", "-6", "addr"]).stdout,
    )
    for fresh in (True, False):
        again = NftApplier(runner).apply(pod_ns, rules, fresh=fresh)  # a restarted agent
        assert (again.changed, again.replaced, again.mode) == (False, "", "nftables")
    after = (
        listing(pod_ns, handles=True),
        pod_ns.run(["ip", "rule"]).stdout,
        pod_ns.run(["ip", "-6", "addr"]).stdout,
    )
    assert first.changed
    assert after == before


def test_both_runners_leave_the_same_tables(lab: Netlab) -> None:
    _needs_root()
    try:
        library = LibRunner()
    except NodeError:
        pytest.skip("libnftables is not installed")
    rules = plan("--ipv6", "-m", "TPROXY", "--redirect-dns", "--capture-all-dns")
    with Netns(lab.add_netns("lib")) as one, Netns(lab.add_netns("bin")) as two:
        NftApplier(library).apply(one, rules)
        NftApplier(ProcessRunner()).apply(two, rules)
        assert ours(one) == ours(two) != ""


def test_changed_spec_leaves_exactly_what_a_fresh_namespace_gets(lab: Netlab, runner: Runner) -> None:
    applier = NftApplier(runner)
    big = plan(
        "--ipv6", "-m", "TPROXY", "--drop-invalid", "--redirect-dns", "--capture-all-dns", "-c", "eth9"
    )
    small = plan("-b", "8080", "-i", "10.0.0.0/8")
    with Netns(lab.add_netns("reused")) as reused, Netns(lab.add_netns("fresh")) as fresh:
        applier.apply(reused, big)
        assert "istio-proxy-mangle" in ours(reused) and "istio-proxy-raw" in ours(reused)
        result = applier.apply(reused, small, fresh=False)
        assert result.changed and "tables" in result.replaced
        applier.apply(fresh, small)
        assert ours(reused) == ours(fresh)
        assert "133" not in reused.run(["ip", "rule", "show"]).stdout


def test_tables_of_others_are_left_alone(pod_ns: Netns, runner: Runner) -> None:
    nft(pod_ns, FOREIGN)
    assert pod_ns.run(
        ["iptables-nft", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "RETURN"]
    ).ok
    theirs = listing(pod_ns)
    applier = NftApplier(runner)
    applier.apply(pod_ns, plan("--ipv6", "-m", "TPROXY", "--drop-invalid"))
    applier.apply(pod_ns, plan("-c", "eth9"), fresh=False)
    applier.apply(pod_ns, plan("-c", "eth9"), fresh=False)
    without_ours = re.sub(r"^table inet istio-proxy-\S+ \{.*?^\}\n", "", listing(pod_ns), flags=re.S | re.M)
    assert without_ours == theirs


def test_drift_is_repaired_and_named(pod_ns: Netns, runner: Runner) -> None:
    rules = plan("--redirect-dns")
    NftApplier(runner).apply(pod_ns, rules)
    intact = ours(pod_ns)
    nft(pod_ns, "flush chain inet istio-proxy-nat istio-output\nadd table inet istio-proxy-mangle\n")
    assert ours(pod_ns) != intact
    repaired = NftApplier(runner).apply(pod_ns, rules, fresh=False)
    assert repaired.changed
    assert "istio-proxy-nat istio-output: 0 rules instead of" in repaired.replaced
    assert "tables" in repaired.replaced  # the stray mangle table
    assert ours(pod_ns) == intact


def test_a_stray_table_of_ours_in_a_namespace_believed_new_is_replaced(lab: Netlab, runner: Runner) -> None:
    # An older ruleset's mangle table, no nat table: the create-only batch succeeds, and the
    # read-back finds the stray table and replaces it.
    with Netns(lab.add_netns("stray")) as stray, Netns(lab.add_netns("clean")) as clean:
        nft(stray, "add table inet istio-proxy-mangle\nadd chain inet istio-proxy-mangle istio-drop\n")
        result = NftApplier(runner).apply(stray, plan())
        assert result.changed and "tables" in result.replaced
        NftApplier(runner).apply(clean, plan())
        assert ours(stray) == ours(clean)


def test_a_ruleset_the_kernel_refuses_is_refused_untouched(pod_ns: Netns, runner: Runner) -> None:
    NftApplier(runner).apply(pod_ns, plan())
    before = listing(pod_ns, handles=True)
    good = plan("-o", "9999")
    broken = dataclasses.replace(
        good, text=good.text + "add rule inet istio-proxy-nat no-such-chain counter\n"
    )
    with pytest.raises(ApplyError) as failed:
        NftApplier(runner).apply(pod_ns, broken, fresh=False)
    assert failed.value.step == "prepare"
    assert "no-such-chain" in failed.value.reason or "No such file" in failed.value.reason
    assert listing(pod_ns, handles=True) == before


class FailingWrites:
    """The real runner, but the transaction that replaces our tables carries one more command
    the kernel refuses: a failure after the read, at the write, as a full netlink buffer or a
    missing module would give."""

    def __init__(self, inner: Runner) -> None:
        self.inner, self.name = inner, inner.name

    def within(self, ns: Netns, body: Any) -> Any:
        return self.inner.within(ns, lambda session: body(_Sabotaged(session)))

    def scratch(self, body: Any) -> Any:
        return self.inner.scratch(body)


class _Sabotaged:
    def __init__(self, inner: Session) -> None:
        self.inner = inner

    def run(self, script: str, *, json_output: bool = False) -> Completed:
        if script.startswith("add table"):  # the replace transaction
            script += "add rule inet istio-proxy-nat no-such-chain counter\n"
        return self.inner.run(script, json_output=json_output)


def test_a_failed_transaction_leaves_the_previous_tables(pod_ns: Netns, runner: Runner) -> None:
    NftApplier(runner).apply(pod_ns, plan("--ipv6", "-m", "TPROXY"))
    before = listing(pod_ns, handles=True), pod_ns.run(["ip", "rule"]).stdout
    with pytest.raises(ApplyError) as failed:
        NftApplier(FailingWrites(runner)).apply(pod_ns, plan("--ipv6", "--drop-invalid"), fresh=False)
    assert failed.value.step == "nft"
    assert "previous rules restored" in failed.value.reason
    assert (listing(pod_ns, handles=True), pod_ns.run(["ip", "rule"]).stdout) == before


def test_tampering_seen_at_read_back_rolls_back_to_the_previous_tables(pod_ns: Netns, runner: Runner) -> None:
    NftApplier(runner).apply(pod_ns, plan("--redirect-dns", "-o", "9999"))
    before = ours(pod_ns)

    def tamper(step: str, ns: Netns) -> None:
        if step == "verify":
            nft(ns, "flush chain inet istio-proxy-nat istio-redirect\n")

    with pytest.raises(ApplyError) as failed:
        NftApplier(runner, on_step=tamper).apply(pod_ns, plan("--drop-invalid"), fresh=False)
    assert failed.value.step == "verify"
    assert "istio-redirect" in failed.value.reason and "previous rules restored" in failed.value.reason
    assert ours(pod_ns) == before


def test_tampering_on_a_new_namespace_rolls_back_to_nothing(pod_ns: Netns, runner: Runner) -> None:
    def tamper(step: str, ns: Netns) -> None:
        if step == "verify":
            nft(ns, "add rule inet istio-proxy-nat istio-output counter accept\n")

    with pytest.raises(ApplyError) as failed:
        NftApplier(runner, on_step=tamper).apply(pod_ns, plan())
    assert failed.value.step == "verify"
    assert ours(pod_ns) == ""


def test_namespace_deleted_mid_apply_gives_a_clear_error(lab: Netlab, runner: Runner) -> None:
    path = lab.add_netns("doomed")

    def vanish(step: str, ns: Netns) -> None:
        if step == "write":
            lab.remove_netns(path)

    with Netns(path) as ns, pytest.raises(ApplyError) as failed:
        NftApplier(runner, on_step=vanish).apply(ns, plan())
    assert "vanished" in failed.value.reason


def test_the_verification_reference_is_what_the_kernel_lists(pod_ns: Netns, runner: Runner) -> None:
    applier = NftApplier(runner)
    rules = plan("--ipv6", "--redirect-dns")
    applier.apply(pod_ns, rules)
    reference = applier.expected.get(rules.text)
    assert reference is not None
    listed = json.loads(pod_ns.run(["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
    kinds: dict[str, int] = {}
    for item in listed:
        ((kind, _),) = item.items()
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(reference.items) == kinds["table"] + kinds["chain"] + kinds["rule"]
    assert sum(1 for item in reference.items if item.kind == "rule") == rules.rule_count()


def test_many_namespaces_programmed_at_once_each_get_their_last_ruleset(lab: Netlab, runner: Runner) -> None:
    # As the agent's workers do: one applier, several threads, the same namespace never twice
    # at once (the per-namespace lock) and libnftables entered from many threads.
    from concurrent.futures import ThreadPoolExecutor

    applier = NftApplier(runner)
    rulesets = [plan(), plan("-m", "TPROXY", "--ipv6"), plan("--redirect-dns", "-o", "9999")]
    paths = [lab.add_netns(f"many{i}") for i in range(6)]
    handles = [Netns(path) for path in paths]
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            # Each namespace gets the first rulesets in any order, then the last one.
            early = [(ns, rules) for rules in rulesets[:-1] for ns in handles for _ in range(2)]
            list(pool.map(lambda job: applier.apply(job[0], job[1]), early))
            list(pool.map(lambda ns: applier.apply(ns, rulesets[-1]), handles))
        with Netns(lab.add_netns("reference")) as reference:
            NftApplier(runner).apply(reference, rulesets[-1])
            for ns in handles:
                assert ours(ns) == ours(reference)
                assert NftApplier(runner).apply(ns, rulesets[-1], fresh=False).changed is False
    finally:
        for ns in handles:
            ns.close()


def iptables_ours(ns: Netns) -> str:
    saved = [ns.run([save]).stdout for save in ("iptables-nft-save", "ip6tables-nft-save")]
    return "".join(line for text in saved for line in text.splitlines(keepends=True) if "ISTIO" in line)


@pytest.mark.parametrize(
    ("before", "after"),
    [((), ()), (("-m", "TPROXY", "--ipv6"), ()), ((), ("-m", "TPROXY", "--ipv6"))],
    ids=["redirect", "from-tproxy", "to-tproxy"],
)
def test_switching_the_mode_leaves_only_the_new_modes_rules(
    lab: Netlab, runner: Runner, before: tuple[str, ...], after: tuple[str, ...]
) -> None:
    from istio_pod_network_controller.node.apply import Applier
    from istio_pod_network_controller.node.backend import Backend, tools
    from istio_pod_network_controller.render import render

    iptables = Applier(tools(Backend.NFT))

    def routes_of(ns: Netns) -> str:
        return ns.run(["ip", "-4", "rule"]).stdout + ns.run(["ip", "-6", "rule"]).stdout

    with Netns(lab.add_netns("switched")) as ns, Netns(lab.add_netns("nft-only")) as nft_only:
        # iptables mode, then the agent restarts in nftables mode and re-checks the pod.
        iptables.apply(ns, render(parse_flags([*SIDECAR, *before])))
        assert iptables_ours(ns) != ""
        result = NftApplier(runner).apply(ns, plan(*after), fresh=False)
        assert "rules of iptables mode removed" in result.replaced
        assert iptables_ours(ns) == ""
        NftApplier(runner).apply(nft_only, plan(*after))
        assert ours(ns) == ours(nft_only)
        assert routes_of(ns).count("lookup 133") == routes_of(nft_only).count("lookup 133")

        # And back: nftables mode's tables go when iptables mode re-checks the pod.
        back = iptables.apply(ns, render(parse_flags([*SIDECAR, *before])), fresh=False)
        assert "tables of nftables mode" in back.replaced
        assert ours(ns) == "" and iptables_ours(ns) != ""
        assert ("lookup 133" in routes_of(ns)) == ("TPROXY" in before)


def test_a_new_pods_apply_looks_for_no_other_mode(pod_ns: Netns, runner: Runner) -> None:
    # A sandbox believed new cannot hold the other mode's rules: nothing is read for them, and a
    # namespace holding some (a test's doing) keeps them.
    from istio_pod_network_controller.node.apply import Applier
    from istio_pod_network_controller.node.backend import Backend, tools
    from istio_pod_network_controller.render import render

    Applier(tools(Backend.NFT)).apply(pod_ns, render(parse_flags(list(SIDECAR))))
    result = NftApplier(runner).apply(pod_ns, plan())
    assert result.replaced == "" and iptables_ours(pod_ns) != ""


# -- a tenant with NET_ADMIN in its own namespace ------------------------------------------------


class Recording:
    """The real runner; every command run in the pod's namespace and the bytes it printed are
    kept, to show what an apply read."""

    def __init__(self, inner: Runner) -> None:
        self.inner, self.name = inner, inner.name
        self.commands: list[tuple[str, int]] = []

    def within(self, ns: Netns, body: Any) -> Any:
        return self.inner.within(ns, lambda session: body(_Recorded(session, self.commands)))

    def scratch(self, body: Any) -> Any:
        return self.inner.scratch(body)


class _Recorded:
    def __init__(self, inner: Session, into: list[tuple[str, int]]) -> None:
        self.inner, self.into = inner, into

    def run(self, script: str, *, json_output: bool = False) -> Completed:
        done = self.inner.run(script, json_output=json_output)
        self.into.append((script, len(done.stdout)))
        return done


def big_tenant_table(ns: Netns, elements: int) -> None:
    # A fixed size lets the kernel pick a hash that never resizes: a resizable one (the
    # default) rehashes in a deferred worker after a big insert, and a listing dumped across
    # that rehash misses elements (seen in CI on a loaded machine: 45,053 of 50,000).
    nft(ns, "add table inet tenant\nadd set inet tenant big { type ipv4_addr; size 65536; }\n")
    addresses = ",".join(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(elements))
    nft(ns, f"add element inet tenant big {{ {addresses} }}\n")


def tenant_set(ns: Netns, elements: int) -> set[str]:
    """The tenant's set as listed once a listing holds all of it (bounded: 40 tries, ~10 s).

    Whatever backend the kernel chose, a dump taken while it rehashes may skip elements; a
    short listing is the kernel's, not ours, so it is taken again, never counted.
    """
    for _ in range(40):
        listed = json.loads(ns.run(["nft", "-j", "list", "set", "inet", "tenant", "big"]).stdout)
        found = {str(e) for item in listed["nftables"] for e in item.get("set", {}).get("elem", ())}
        if len(found) >= elements:
            return found
        time.sleep(0.25)
    return found


def test_a_tenants_big_table_is_never_listed(lab: Netlab, runner: Runner) -> None:
    rules = plan("--ipv6", "--redirect-dns")
    with Netns(lab.add_netns("tenant")) as tenant, Netns(lab.add_netns("clean")) as clean:
        big_tenant_table(tenant, 50_000)
        theirs = tenant_set(tenant, 50_000)
        assert len(theirs) == 50_000
        seen: dict[str, Recording] = {}
        for name, ns in (("tenant", tenant), ("clean", clean)):
            seen[name] = recording = Recording(runner)
            applier = NftApplier(recording)
            assert applier.apply(ns, rules, fresh=False).changed  # read, write, verify
            assert not applier.apply(ns, rules, fresh=False).changed  # read only
        lists = {name: [c for c in r.commands if c[0].startswith("list")] for name, r in seen.items()}
        assert lists["tenant"] and all("istio-proxy-" in script for script, _ in lists["tenant"])
        assert [s for s, _ in lists["tenant"]] == [s for s, _ in lists["clean"]]
        # Our tables only: what was listed is what a clean namespace lists, give or take the
        # digits of handles, nowhere near the tenant's ~1 MB set.
        listed = {name: sum(size for _, size in found) for name, found in lists.items()}
        assert listed["tenant"] < 1.2 * listed["clean"]
        assert tenant_set(tenant, 50_000) == theirs
        assert ours(tenant) == ours(clean)


CHURN = """
import subprocess, sys, time
# Bounded: ends by itself after the given seconds if the test cannot stop it.
end = time.monotonic() + float(sys.argv[1])
nft = subprocess.Popen(["nft", "-f", "-"], stdin=subprocess.PIPE, text=True)
nft.stdin.write("add table inet tenant2\\n")
while time.monotonic() < end:
    nft.stdin.write("add chain inet tenant2 c\\ndelete chain inet tenant2 c\\n")
nft.stdin.close()
"""

CHURN_LIB = """
import ctypes, sys, time
lib = ctypes.CDLL("libnftables.so.1")
lib.nft_ctx_new.restype = ctypes.c_void_p
lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.nft_ctx_buffer_output.argtypes = lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
ctx = lib.nft_ctx_new(0)
lib.nft_ctx_buffer_output(ctx)
lib.nft_ctx_buffer_error(ctx)
lib.nft_run_cmd_from_buffer(ctx, b"add table inet tenant2")
# Bounded: ends by itself after the given seconds if the test cannot stop it.
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    lib.nft_run_cmd_from_buffer(ctx, b"add chain inet tenant2 c; delete chain inet tenant2 c")
"""


def test_a_tenant_churning_commits_blocks_neither_its_apply_nor_anyone_elses(lab: Netlab) -> None:
    import subprocess
    import sys
    import threading
    import time

    _needs_root()
    try:
        runner: Runner = LibRunner(timeout=10.0)
        script = CHURN_LIB
    except NodeError:
        runner, script = ProcessRunner(), CHURN
    applier = NftApplier(runner)
    rules = plan()
    applier.expected.compute(runner, rules.text)
    path = lab.add_netns("churn")
    with Netns(path) as tenant:
        # With a big table, a whole-ruleset dump is long enough that every one is restarted by
        # the next commit: what made a listing of it never end.
        big_tenant_table(tenant, 50_000)
    churn = subprocess.Popen(["nsenter", f"--net={path}", "--", sys.executable, "-c", script, "90"])  # noqa: S603
    outcome: dict[str, object] = {}
    try:
        time.sleep(1.0)  # the tenant is committing before we start
        assert churn.poll() is None

        def in_churning() -> None:
            with Netns(path) as ns:
                try:
                    outcome["churning"] = applier.apply(ns, rules, fresh=False).changed
                except ApplyError as exc:  # allowed: a clear error within the time bound
                    outcome["churning"] = exc

        started = threading.Thread(target=in_churning, daemon=True)
        started.start()
        time.sleep(0.5)
        with Netns(lab.add_netns("innocent")) as innocent:
            other = threading.Thread(
                target=lambda: outcome.setdefault("innocent", applier.apply(innocent, rules).changed),
                daemon=True,
            )
            other.start()
            other.join(60)
            assert outcome.get("innocent") is True, "another pod's apply waited for the tenant"
            assert ours(innocent) != ""
        started.join(60)
        assert "churning" in outcome, "the churning namespace's apply never returned"
        if isinstance(outcome["churning"], ApplyError):
            assert "did not finish within" in outcome["churning"].reason
            assert path in outcome["churning"].reason
    finally:
        churn.kill()
        churn.wait()


def test_an_apply_that_outlives_its_deadline_fails_clearly_and_stops(pod_ns: Netns) -> None:
    import time

    _needs_root()
    try:
        runner = LibRunner(timeout=0.5)
    except NodeError:
        pytest.skip("libnftables is not installed")
    recording = Recording(runner)

    def stall(step: str, ns: Netns) -> None:
        if step == "read":
            time.sleep(1.5)

    applier = NftApplier(recording, on_step=stall)
    applier.expected.compute(runner, plan().text)
    with pytest.raises(ApplyError) as failed:
        applier.apply(pod_ns, plan(), fresh=False)
    assert "did not finish within 0.5s" in failed.value.reason and pod_ns.path in failed.value.reason
    assert runner.abandoned == 1
    for _ in range(50):  # bounded: the stalled thread ends a second later
        if runner.stuck() == 0:
            break
        time.sleep(0.1)
    assert runner.stuck() == 0
    assert recording.commands == []  # woke up abandoned: no command ran
    assert ours(pod_ns) == ""


def v6_addresses(ns: Netns) -> str:
    return ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout


def test_a_failed_apply_takes_away_the_passthrough_address_it_added(pod_ns: Netns, runner: Runner) -> None:
    # Believed new, but a table of ours is there: the create-only batch fails after `::6` was
    # added beside it; the read-first path finds `::6` present, and its write fails.
    nft(pod_ns, "add table inet istio-proxy-nat\n")
    before = listing(pod_ns, handles=True)
    assert "::6/128" not in v6_addresses(pod_ns)
    with pytest.raises(ApplyError) as failed:
        NftApplier(FailingWrites(runner)).apply(pod_ns, plan("--ipv6"))
    assert "previous rules restored" in failed.value.reason
    assert "::6/128" not in v6_addresses(pod_ns)
    assert listing(pod_ns, handles=True) == before


def test_a_failed_apply_keeps_a_passthrough_address_it_did_not_add(pod_ns: Netns, runner: Runner) -> None:
    assert pod_ns.run(["ip", "-6", "addr", "add", "::6/128", "dev", "lo"]).ok
    nft(pod_ns, "add table inet istio-proxy-nat\n")
    with pytest.raises(ApplyError):
        NftApplier(FailingWrites(runner)).apply(pod_ns, plan("--ipv6"))
    assert "::6/128" in v6_addresses(pod_ns)
