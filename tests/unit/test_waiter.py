"""The waiting init container: which marks count, how fast it notices them, what it says on exit,
and how it proves the redirect from the agent's plan alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev import as_pod
from ipnc_dev.podinfo_volume import write_podinfo
from istio_pod_network_controller import names
from istio_pod_network_controller.probe import Probe, Skip, plan_verify, probe_plan, waiter_ids
from istio_pod_network_controller.spec import parse_flags, spec_from_pod
from istio_pod_network_controller.waiter import (
    AgentFailed,
    Initialized,
    Options,
    PollingWatcher,
    WaitFailed,
    Waiting,
    judge_mark,
    netns_inode,
    planned_check,
    run,
    wait_for_mark,
)

INODE = 4026532281


def marked(status: str, **detail: Any) -> dict[str, str]:
    return {names.STATUS: status, names.DETAIL: json.dumps(detail)}


# -- which marks count --------------------------------------------------------------------------


def test_initialized_for_our_namespace_passes() -> None:
    found = judge_mark(marked("initialized", netnsInode=INODE, rulesetSha256="ab"), INODE)
    assert isinstance(found, Initialized)
    assert found.detail["rulesetSha256"] == "ab"


def test_a_mark_for_an_earlier_sandbox_does_not_count() -> None:
    found = judge_mark(marked("initialized", netnsInode=INODE - 1), INODE)
    assert isinstance(found, Waiting)
    assert "earlier sandbox" in found.reason


@pytest.mark.parametrize(
    ("annotations", "seen"),
    [
        ({}, "is absent"),
        ({names.STATUS: "initialized"}, f"{names.DETAIL} is absent"),
        ({names.STATUS: "initialized", names.DETAIL: "{not json"}, "not JSON"),
        ({names.STATUS: "initialized", names.DETAIL: "[1]"}, "not a JSON object"),
        (marked("initialized"), "no integer netnsInode"),
        (marked("initialized", netnsInode=str(INODE)), "no integer netnsInode"),
        (marked("initialized", netnsInode=True), "no integer netnsInode"),
        ({names.STATUS: "pending"}, "'pending', not 'initialized'"),
    ],
)
def test_anything_but_our_mark_keeps_waiting_and_says_what_it_saw(
    annotations: dict[str, str], seen: str
) -> None:
    found = judge_mark(annotations, INODE)
    assert isinstance(found, Waiting)
    assert seen in found.reason


def test_the_agents_error_is_reported_in_one_line() -> None:
    found = judge_mark(marked("error", error="annotation x: invalid value 'y'\nsecond line"), INODE)
    assert found == AgentFailed("annotation x: invalid value 'y' second line")


def test_an_error_without_a_reason_still_fails_clearly() -> None:
    assert judge_mark({names.STATUS: "error"}, INODE) == AgentFailed("(the agent gave no reason)")


def test_an_error_for_an_earlier_sandbox_keeps_waiting() -> None:
    assert isinstance(judge_mark(marked("error", error="boom", netnsInode=INODE + 5), INODE), Waiting)
    assert isinstance(judge_mark(marked("error", error="boom", netnsInode=INODE), INODE), AgentFailed)


def test_an_apply_failure_the_agent_retries_keeps_the_waiter_waiting() -> None:
    found = judge_mark(marked("error", error="restore: busy", reason="ApplyFailed", netnsInode=INODE), INODE)
    assert isinstance(found, Waiting) and "retrying: restore: busy" in found.reason
    bad = marked("error", error="bad annotation", reason="InvalidConfiguration", netnsInode=INODE)
    assert judge_mark(bad, INODE) == AgentFailed("bad annotation")


# -- waiting ------------------------------------------------------------------------------------


class ScriptedWatcher:
    """Each wait() advances a fake clock and may publish a new version of the file."""

    def __init__(self, folder: Path, steps: list[dict[str, str] | None], clock: list[float]) -> None:
        self.folder, self.steps, self.clock, self.waits = folder, steps, clock, 0

    def wait(self, timeout: float, also: int | None = None) -> None:
        self.waits += 1
        self.clock[0] += min(timeout, 1.0)
        if self.steps:
            step = self.steps.pop(0)
            if step is not None:
                write_podinfo(self.folder, step)

    def close(self) -> None:
        pass


def test_waits_through_stale_and_missing_marks_until_its_own(tmp_path: Path) -> None:
    path = write_podinfo(tmp_path, {})
    clock = [0.0]
    watcher = ScriptedWatcher(
        tmp_path,
        [marked("initialized", netnsInode=1), None, marked("initialized", netnsInode=INODE)],
        clock,
    )
    logged: list[str] = []
    mark, annotations = wait_for_mark(
        str(path), inode=INODE, timeout=60, watcher=watcher, clock=lambda: clock[0], log=logged.append
    )
    assert mark.detail["netnsInode"] == INODE
    assert annotations[names.STATUS] == "initialized"
    assert watcher.waits == 3
    assert any("earlier sandbox" in line for line in logged)


def test_timeout_names_what_it_waited_for_and_what_it_saw(tmp_path: Path) -> None:
    path = write_podinfo(tmp_path, {names.STATUS: "initialized", names.DETAIL: '{"netnsInode": 7}'})
    clock = [0.0]
    with pytest.raises(WaitFailed) as info:
        wait_for_mark(
            str(path), inode=INODE, timeout=5, watcher=ScriptedWatcher(tmp_path, [], clock),
            clock=lambda: clock[0],
        )  # fmt: skip
    message = str(info.value)
    assert info.value.exit_code == 1
    assert message.startswith(
        "timed out after 5s waiting for pod-network-controller.istio.io/status=initialized"
    )
    assert f"network namespace {INODE}" in message and str(path) in message
    assert "network namespace 7, an earlier sandbox" in message


def test_a_missing_file_is_waited_for(tmp_path: Path) -> None:
    clock = [0.0]
    with pytest.raises(WaitFailed, match="does not exist"):
        wait_for_mark(
            str(tmp_path / "annotations"), inode=INODE, timeout=2,
            watcher=ScriptedWatcher(tmp_path, [], clock), clock=lambda: clock[0],
        )  # fmt: skip


def test_the_agents_error_ends_the_wait_at_once(tmp_path: Path) -> None:
    path = write_podinfo(tmp_path, marked("error", error="traffic.sidecar.istio.io/x: invalid value 'y'"))
    with pytest.raises(WaitFailed) as info:
        wait_for_mark(str(path), inode=INODE, timeout=60, watcher=PollingWatcher())
    assert info.value.exit_code == 1
    assert str(info.value) == (
        "the node agent could not program this pod: traffic.sidecar.istio.io/x: invalid value 'y'"
    )


def test_a_file_not_in_the_kubelet_format_is_invalid_input(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    path.write_text('k="unterminated\n')
    with pytest.raises(WaitFailed, match="line 1") as info:
        wait_for_mark(str(path), inode=INODE, timeout=60, watcher=PollingWatcher())
    assert info.value.exit_code == 2


def _publish_later(
    folder: Path, annotations: dict[str, str], delay: float, at: list[float]
) -> threading.Thread:
    def publish() -> None:
        time.sleep(delay)
        at.append(time.monotonic())
        write_podinfo(folder, annotations)

    thread = threading.Thread(target=publish)
    thread.start()
    return thread


def test_inotify_notices_the_kubelets_symlink_swap_at_once(tmp_path: Path) -> None:
    path = write_podinfo(tmp_path, {names.OPT_IN: "true"})
    inode = netns_inode()
    published: list[float] = []
    thread = _publish_later(tmp_path, marked("initialized", netnsInode=inode), 0.3, published)
    code, line = run(Options(file=str(path), timeout=10), log=lambda _: None)
    seen = time.monotonic()
    thread.join()
    assert code == 0, line
    assert line.startswith(f"pod initialized for network namespace {inode}")
    assert seen - published[0] < 0.1, "the change took more than 100 ms to notice"


def _cli(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    if user is None:
        argv = [sys.executable, "-m", "istio_pod_network_controller.cli", "init", *args]
    else:
        argv = as_pod.command(None, user, "init", *args)  # non-root, no capabilities, no_new_privs
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603


def test_cli_prints_one_line_on_stdout_when_the_pod_may_start(tmp_path: Path) -> None:
    detail = {
        "netnsInode": netns_inode(),
        "rulesetSha256": "0123456789abcdef",
        "appliedAt": "2026-01-01T00:00:00Z",
    }
    path = write_podinfo(tmp_path, {names.STATUS: "initialized", names.DETAIL: json.dumps(detail)})
    done = _cli("--file", str(path), "--timeout", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"istio-pod-network-controller init: pod initialized for network namespace {detail['netnsInode']}, "
        f"mark read from {path} (ruleset 0123456789ab, applied 2026-01-01T00:00:00Z)"
    ]


def test_cli_timeout_exits_1_with_one_closing_line(tmp_path: Path) -> None:
    path = write_podinfo(tmp_path, {})
    done = _cli("--file", str(path), "--timeout", "0.3")
    assert done.returncode == 1
    assert done.stdout == ""
    last = done.stderr.splitlines()[-1]
    assert last.startswith("istio-pod-network-controller init: timed out after 0.3s waiting for")


@pytest.mark.parametrize("args", [["--timeout", "0"], ["--timeout", "soon"], ["--bogus"], ["extra"]])
def test_cli_rejects_bad_arguments_with_exit_2(args: list[str]) -> None:
    done = _cli(*args)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged UID")
def test_runs_as_an_unprivileged_uid_and_writes_nothing() -> None:
    with tempfile.TemporaryDirectory(prefix="ipnc-podinfo-") as folder:
        volume = Path(folder)
        volume.chmod(0o755)  # as the kubelet's volume: readable by the pod's UID
        detail = {"netnsInode": netns_inode()}
        path = write_podinfo(volume, {names.STATUS: "initialized", names.DETAIL: json.dumps(detail)})
        before = sorted(p.name for p in volume.rglob("*"))
        done = _cli("--file", str(path), "--timeout", "5", user=65532)
        assert done.returncode == 0, done.stderr
        assert "polling" not in done.stderr  # inotify works unprivileged
        assert sorted(p.name for p in volume.rglob("*")) == before


# -- which connection proves the redirect --------------------------------------------------------

SIDECAR = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
           "-x", "", "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip


def spec(*extra: str) -> Any:
    return parse_flags([*SIDECAR[1:], *extra])


def test_default_sidecar_is_proven_with_a_test_net_address() -> None:
    assert plan_verify(spec(), uid=65532, gid=65532) == Probe("192.0.2.1", 80, 15001)


def test_the_probe_targets_the_configured_proxy_port() -> None:
    assert plan_verify(spec("-p", "16001"), uid=65532, gid=65532) == Probe("192.0.2.1", 80, 16001)


def test_excluded_address_and_port_move_the_probe_elsewhere() -> None:
    assert plan_verify(spec("-x", "192.0.2.0/24"), uid=1, gid=1) == Probe("198.51.100.1", 80, 15001)
    assert plan_verify(spec("-o", "80"), uid=1, gid=1) == Probe("192.0.2.1", 8080, 15001)


def test_capture_limited_to_cluster_ranges_is_skipped() -> None:
    found = plan_verify(spec("-i", "10.96.0.0/12"), uid=1, gid=1)
    assert isinstance(found, Skip)
    assert "covers none of 192.0.2.1:80" in found.reason


def test_a_listed_range_or_included_port_that_covers_the_address_is_used() -> None:
    assert plan_verify(spec("-i", "192.0.2.0/24"), uid=1, gid=1) == Probe("192.0.2.1", 80, 15001)
    assert plan_verify(spec("-i", "", "-q", "8080"), uid=1, gid=1) == Probe("192.0.2.1", 8080, 15001)


def test_running_as_the_proxy_skips_the_check() -> None:
    assert isinstance(plan_verify(spec(), uid=1337, gid=65532), Skip)
    assert isinstance(plan_verify(spec(), uid=65532, gid=1337), Skip)


def test_owner_group_selection_is_honoured() -> None:
    assert isinstance(plan_verify(spec("--owner-groups-exclude", "65532"), uid=1, gid=65532), Skip)
    assert isinstance(plan_verify(spec("--owner-groups-include", "100"), uid=1, gid=65532), Skip)
    assert isinstance(plan_verify(spec("--owner-groups-include", "65532"), uid=1, gid=65532), Probe)
    assert isinstance(plan_verify(spec("--owner-groups-exclude", "java"), uid=1, gid=65532), Skip)


def test_excluded_interfaces_skip_the_check() -> None:
    assert isinstance(plan_verify(spec("-c", "eth1"), uid=1, gid=1), Skip)


def test_a_plan_names_the_probe_and_the_ids_it_was_made_for() -> None:
    plan = probe_plan(spec("-p", "16001"), uid=65532, gid=65532)
    assert plan == {"uid": 65532, "gid": 65532, "address": "192.0.2.1", "port": 80, "proxyPort": 16001}
    assert json.loads(json.dumps(plan)) == plan


def test_a_plan_for_a_waiter_running_as_the_proxy_says_it_is_a_misconfiguration() -> None:
    plan = probe_plan(spec(), uid=1337, gid=65532)
    assert set(plan) == {"uid", "gid", "skip"}
    assert plan["skip"].startswith("misconfiguration: the waiter runs as UID 1337 / GID 65532")
    assert "proxy's UIDs 1337" in plan["skip"]


@pytest.mark.parametrize(("uid", "gid", "unknown"), [(None, 1, "runAsUser"), (1, None, "runAsGroup"),
                                                      (None, None, "runAsUser and runAsGroup")])  # fmt: skip
def test_a_plan_for_unknown_ids_is_a_skip_that_says_which(
    uid: int | None, gid: int | None, unknown: str
) -> None:
    plan = probe_plan(spec(), uid=uid, gid=gid)
    assert plan == {
        "uid": uid,
        "gid": gid,
        "skip": f"the pod spec does not give the waiter's {unknown}, so whether the rules capture its "
        "connections cannot be told",
    }


def test_the_plan_follows_the_spec_the_agent_builds_from_traffic_annotations() -> None:
    pod = {
        "metadata": {"annotations": {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "192.0.2.1/32"}},
        "spec": {"containers": [{"name": "istio-proxy"}]},
    }
    plan = probe_plan(spec_from_pod(pod), uid=65532, gid=65532)
    assert (plan["address"], plan["port"]) == ("198.51.100.1", 80)


def _with_waiter(
    security: dict[str, Any] | None, pod_security: dict[str, Any] | None = None
) -> dict[str, Any]:
    waiter: dict[str, Any] = {"name": names.WAITER_CONTAINER}
    if security is not None:
        waiter["securityContext"] = security
    pod: dict[str, Any] = {"spec": {"initContainers": [{"name": "other", "securityContext": {"runAsUser": 7}},
                                                       waiter]}}  # fmt: skip
    if pod_security is not None:
        pod["spec"]["securityContext"] = pod_security
    return pod


def test_waiter_ids_are_its_containers_then_the_pods() -> None:
    assert waiter_ids(_with_waiter({"runAsUser": 65532, "runAsGroup": 65533})) == (65532, 65533)
    assert waiter_ids(_with_waiter({"runAsUser": 5}, {"runAsUser": 6, "runAsGroup": 8})) == (5, 8)
    assert waiter_ids(_with_waiter(None, {"runAsUser": 6})) == (6, None)  # the GID is the image's
    assert waiter_ids(_with_waiter({})) == (None, None)
    assert waiter_ids({"spec": {"initContainers": [{"name": "app"}]}}) == (None, None)
    assert waiter_ids({"spec": "garbage"}) == (None, None)


@pytest.mark.parametrize("bad", [True, -1, "65532", 2**32 - 1, 1.5])
def test_waiter_ids_that_are_not_ids_are_unknown(bad: Any) -> None:
    assert waiter_ids(_with_waiter({"runAsUser": bad, "runAsGroup": bad}, {"runAsUser": 9})) == (None, None)


# -- the waiter follows the agent's plan, and nothing the pod wrote ------------------------------

PLAN = {"uid": 65532, "gid": 65532, "address": "192.0.2.1", "port": 80, "proxyPort": 15001}


def test_a_plan_for_our_ids_is_probed() -> None:
    assert planned_check({"verify": PLAN}, uid=65532, gid=65532) == Probe("192.0.2.1", 80, 15001)


def test_a_plan_for_other_ids_is_not_probed_and_says_so() -> None:
    found = planned_check({"verify": PLAN}, uid=1000, gid=0)
    assert isinstance(found, Skip)
    assert found.reason.startswith(
        "the agent planned the check for UID 65532 / GID 65532, but this container runs as UID 1000 / GID 0"
    )


def test_the_agents_skip_is_repeated_on_one_line() -> None:
    found = planned_check({"verify": {"uid": 1, "gid": 1, "skip": "because\nof this"}}, uid=2, gid=2)
    assert found == Skip("because of this")


def test_a_mark_without_a_plan_is_not_probed() -> None:
    found = planned_check({"netnsInode": 1, "proxyUids": [1337]}, uid=65532, gid=65532)
    assert isinstance(found, Skip) and "no probe plan" in found.reason


@pytest.mark.parametrize(
    ("plan", "problem"),
    [
        ([PLAN], "not a JSON object"),
        ({**PLAN, "uid": "65532"}, "uid is not a UID/GID or null"),
        ({**PLAN, "gid": True}, "gid is not a UID/GID or null"),
        ({**PLAN, "address": "127.0.0.1"}, "address is not one of"),  # would reach our listener unredirected
        ({**PLAN, "address": "10.0.0.1"}, "address is not one of"),
        ({**PLAN, "port": 15001}, "port is not one of"),
        ({**PLAN, "port": 80.0}, "port is not one of"),
        ({**PLAN, "proxyPort": 80}, "proxyPort is not a port other than the probe's"),
        ({**PLAN, "proxyPort": 0}, "proxyPort is not a port other than the probe's"),
        ({**PLAN, "uid": None}, "it names a probe but not the UID and GID"),
        ({"uid": 1, "gid": 1, "skip": ""}, "skip is not a non-empty string"),
        ({**PLAN, "skip": "x"}, "it both skips and names a probe"),
    ],
)
def test_a_plan_the_agent_does_not_write_is_not_probed(plan: Any, problem: str) -> None:
    found = planned_check({"verify": plan}, uid=65532, gid=65532)
    assert isinstance(found, Skip)
    assert found.reason.startswith(f"the agent's probe plan is not usable: {problem}")


class Proofs:
    """Stands in for ``prove_redirect`` (unit tests send no traffic): records each probe."""

    def __init__(self) -> None:
        self.probes: list[Probe] = []

    def __call__(self, probe: Probe, *, timeout: float) -> str:
        self.probes.append(probe)
        target = f"{probe.address}:{probe.port}"
        return f"outbound redirect proven: {target} reached the proxy port {probe.proxy_port}"


@pytest.fixture
def proofs(monkeypatch: pytest.MonkeyPatch) -> Proofs:
    from istio_pod_network_controller import waiter

    found = Proofs()
    monkeypatch.setattr(waiter, "prove_redirect", found)
    return found


def _verify(tmp_path: Path, detail: dict[str, Any], **pod_wrote: str) -> tuple[int, str, list[str]]:
    annotations = {
        names.STATUS: "initialized",
        names.DETAIL: json.dumps({"netnsInode": netns_inode(), **detail}),
    }
    path = write_podinfo(tmp_path, {**annotations, **pod_wrote})
    logged: list[str] = []
    code, line = run(Options(file=str(path), timeout=5, verify=True), log=logged.append, uid=65532, gid=65532)
    return code, line, logged


# What a tenant can write on its own pod to make a waiter that trusted it skip the check.
FORGED = {
    "traffic.sidecar.istio.io/excludeInterfaces": "eth0",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "80,8080,443",
    "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8",
    names.IPTABLES_ARGS: json.dumps(["istio-iptables", "-u", "65532", "-o", "80,8080,443", "-c", "eth0"]),
}


def test_what_the_pod_wrote_does_not_turn_the_agents_probe_into_a_skip(
    tmp_path: Path, proofs: Proofs
) -> None:
    forged_detail = {"verify": PLAN, "proxyUids": [65532], "proxyGids": [65532]}
    code, line, logged = _verify(tmp_path, forged_detail, **FORGED)
    assert code == 0
    assert proofs.probes == [Probe("192.0.2.1", 80, 15001)]
    assert line.endswith("; outbound redirect proven: 192.0.2.1:80 reached the proxy port 15001")
    assert not any("skipped" in entry for entry in logged)


def test_a_failed_probe_fails_the_pod_whatever_the_pod_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from istio_pod_network_controller import waiter

    def fail(probe: Probe, *, timeout: float) -> str:
        raise WaitFailed(
            "redirect check failed: connecting to 192.0.2.1:80 did not reach the local listener", 1
        )

    monkeypatch.setattr(waiter, "prove_redirect", fail)
    code, line, _ = _verify(tmp_path, {"verify": PLAN, "proxyUids": [65532]}, **FORGED)
    assert (code, line) == (
        1,
        "redirect check failed: connecting to 192.0.2.1:80 did not reach the local listener",
    )


def test_the_agents_skip_passes_without_claiming_a_proof(tmp_path: Path, proofs: Proofs) -> None:
    reason = "the pod's outbound capture covers none of 192.0.2.1:80"
    code, line, logged = _verify(tmp_path, {"verify": {"uid": 65532, "gid": 65532, "skip": reason}})
    assert code == 0 and proofs.probes == []
    assert line.endswith("; redirect check skipped (relying on the agent's read-back of the rules)")
    assert "proven" not in line
    assert f"redirect check skipped: {reason}; relying on the agent's read-back of the rules" in logged


def test_a_waiter_running_as_the_proxy_says_so(tmp_path: Path, proofs: Proofs) -> None:
    plan = probe_plan(spec("-u", "65532"), uid=65532, gid=65532)
    code, line, logged = _verify(tmp_path, {"verify": plan})
    assert code == 0 and proofs.probes == [] and "proven" not in line
    assert any(entry.startswith("redirect check skipped: misconfiguration: the waiter runs as UID 65532")
               for entry in logged)  # fmt: skip


def test_a_mark_without_a_plan_passes_unproven_whatever_the_pod_wrote(tmp_path: Path, proofs: Proofs) -> None:
    code, line, logged = _verify(
        tmp_path, {"proxyUids": [1337]}, **{names.IPTABLES_ARGS: json.dumps(SIDECAR)}
    )
    assert code == 0 and proofs.probes == [] and "proven" not in line
    assert any("no probe plan" in entry for entry in logged)


# -- a hostile detail annotation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("detail", "said"),
    [
        ("[" * 60_000, "is nested 60000 levels deep, more than the limit of 64"),
        (
            '{"netnsInode": 1, "pad": "' + "x" * 270_000 + '"}',
            f"bytes, more than the limit of {names.MAX_DETAIL_BYTES}",
        ),
    ],
)
def test_a_hostile_detail_is_one_line_and_no_recursion(detail: str, said: str) -> None:
    found = judge_mark({names.STATUS: "initialized", names.DETAIL: detail}, INODE)
    assert isinstance(found, Waiting)
    assert said in found.reason and "\n" not in found.reason
    assert isinstance(judge_mark({names.STATUS: "error", names.DETAIL: detail}, INODE), AgentFailed)


def test_cli_with_a_deeply_nested_detail_ends_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    path = write_podinfo(tmp_path, {names.STATUS: "initialized", names.DETAIL: "{" * 60_000})
    done = _cli("--file", str(path), "--timeout", "0.3", "--verify")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr
    assert "is nested 60000 levels deep" in done.stderr.splitlines()[-1]


# -- the watch made only when needed ----------------------------------------------------------


def test_a_waiter_whose_mark_is_there_at_first_look_makes_no_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from istio_pod_network_controller import waiter

    made: list[str] = []
    monkeypatch.setattr(waiter, "make_watcher", lambda path, *, log: made.append(path) or PollingWatcher())
    detail = {"netnsInode": netns_inode(), "rulesetSha256": "ab" * 32}
    path = write_podinfo(tmp_path, {names.STATUS: "initialized", names.DETAIL: json.dumps(detail)})
    code, line = run(Options(file=str(path), timeout=5, handoff=False), log=lambda _: None)
    assert code == 0, line
    assert made == []


def test_the_watch_is_made_at_the_first_wait_and_the_file_read_again_at_once(tmp_path: Path) -> None:
    from istio_pod_network_controller.waiter import LazyWatcher

    class Recording(PollingWatcher):
        def __init__(self) -> None:
            super().__init__(sleep=lambda seconds: waits.append(seconds))
            self.closed = False

        def close(self) -> None:
            self.closed = True

    waits: list[float] = []
    made: list[Recording] = []
    lazy = LazyWatcher(lambda: made.append(Recording()) or made[-1])
    lazy.wait(10.0)  # makes the watch, does not wait: the caller reads the file again
    assert len(made) == 1 and waits == []
    lazy.wait(10.0)
    assert len(made) == 1 and waits == [pytest.approx(0.05)]
    lazy.close()
    assert made[0].closed
    LazyWatcher(lambda: made.append(Recording()) or made[-1]).close()  # never made: nothing to close
    assert len(made) == 1
