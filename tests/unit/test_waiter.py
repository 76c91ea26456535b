"""The waiting init container: which marks count, how fast it notices them, what it says on exit,
and which connection it would use to prove the redirect."""

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

from istio_pod_network_controller import names
from istio_pod_network_controller.spec import parse_flags
from istio_pod_network_controller.testing import as_pod
from istio_pod_network_controller.testing.podinfo_volume import write_podinfo
from istio_pod_network_controller.waiter import (
    AgentFailed,
    Initialized,
    Options,
    PollingWatcher,
    Probe,
    Skip,
    WaitFailed,
    Waiting,
    netns_inode,
    observe,
    plan_verify,
    run,
    spec_from_annotations,
    wait_for_mark,
)

INODE = 4026532281


def marked(status: str, **detail: Any) -> dict[str, str]:
    return {names.STATUS: status, names.DETAIL: json.dumps(detail)}


# -- which marks count --------------------------------------------------------------------------


def test_initialized_for_our_namespace_passes() -> None:
    found = observe(marked("initialized", netnsInode=INODE, rulesetSha256="ab"), INODE)
    assert isinstance(found, Initialized)
    assert found.detail["rulesetSha256"] == "ab"


def test_a_mark_for_an_earlier_sandbox_does_not_count() -> None:
    found = observe(marked("initialized", netnsInode=INODE - 1), INODE)
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
    found = observe(annotations, INODE)
    assert isinstance(found, Waiting)
    assert seen in found.reason


def test_the_agents_error_is_reported_in_one_line() -> None:
    found = observe(marked("error", error="annotation x: invalid value 'y'\nsecond line"), INODE)
    assert found == AgentFailed("annotation x: invalid value 'y' second line")


def test_an_error_without_a_reason_still_fails_clearly() -> None:
    assert observe({names.STATUS: "error"}, INODE) == AgentFailed("(the agent gave no reason)")


def test_an_error_for_an_earlier_sandbox_keeps_waiting() -> None:
    assert isinstance(observe(marked("error", error="boom", netnsInode=INODE + 5), INODE), Waiting)
    assert isinstance(observe(marked("error", error="boom", netnsInode=INODE), INODE), AgentFailed)


def test_an_apply_failure_the_agent_retries_keeps_the_waiter_waiting() -> None:
    found = observe(marked("error", error="restore: busy", reason="ApplyFailed", netnsInode=INODE), INODE)
    assert isinstance(found, Waiting) and "retrying: restore: busy" in found.reason
    bad = marked("error", error="bad annotation", reason="InvalidConfiguration", netnsInode=INODE)
    assert observe(bad, INODE) == AgentFailed("bad annotation")


# -- waiting ------------------------------------------------------------------------------------


class ScriptedWatcher:
    """Each wait() advances a fake clock and may publish a new version of the file."""

    def __init__(self, folder: Path, steps: list[dict[str, str] | None], clock: list[float]) -> None:
        self.folder, self.steps, self.clock, self.waits = folder, steps, clock, 0

    def wait(self, timeout: float) -> None:
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
        f"istio-pod-network-controller init: pod initialized for network namespace {detail['netnsInode']} "
        "(ruleset 0123456789ab, applied 2026-01-01T00:00:00Z)"
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


def test_the_spec_comes_from_the_webhooks_copy_of_istio_init_args() -> None:
    annotations = {names.IPTABLES_ARGS: json.dumps([*SIDECAR, "-i", "10.0.0.0/8"])}
    assert isinstance(plan_verify(spec_from_annotations(annotations), uid=1, gid=1), Skip)


def test_or_from_the_traffic_annotations() -> None:
    annotations = {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "192.0.2.1/32"}
    found = plan_verify(spec_from_annotations(annotations), uid=1, gid=1)
    assert found == Probe("198.51.100.1", 80, 15001)


def test_verify_is_skipped_with_a_log_line_when_capture_does_not_cover_it(tmp_path: Path) -> None:
    annotations = marked("initialized", netnsInode=netns_inode())
    annotations[names.IPTABLES_ARGS] = json.dumps([*SIDECAR, "-i", "10.0.0.0/8"])
    path = write_podinfo(tmp_path, annotations)
    logged: list[str] = []
    code, line = run(Options(file=str(path), timeout=5, verify=True), log=logged.append, uid=65532, gid=65532)
    assert code == 0
    assert line.endswith("; redirect check skipped")
    assert any(
        entry.startswith("redirect check skipped: the pod's outbound capture covers none") for entry in logged
    )


def test_verify_with_unreadable_traffic_settings_is_skipped(tmp_path: Path) -> None:
    annotations = marked("initialized", netnsInode=netns_inode())
    annotations[names.IPTABLES_ARGS] = "not json"
    path = write_podinfo(tmp_path, annotations)
    logged: list[str] = []
    code, _ = run(Options(file=str(path), timeout=5, verify=True), log=logged.append)
    assert code == 0
    assert any("cannot be read from its annotations" in entry for entry in logged)


def test_verify_uses_the_proxy_ids_the_agent_applied() -> None:
    from istio_pod_network_controller.waiter import Skip, _with_agents_ids, plan_verify, spec_from_annotations

    spec = spec_from_annotations({})  # CNI defaults: proxy 1337, as far as the annotations tell
    applied = _with_agents_ids(spec, {"proxyUids": [1000620000], "proxyGids": [1337]})
    assert applied.proxy_uids == (1000620000,)
    assert isinstance(plan_verify(applied, uid=1000620000, gid=0), Skip)  # the waiter is the proxy's UID
    assert _with_agents_ids(spec, {"proxyUids": ["x"]}) == spec  # malformed: ignored
