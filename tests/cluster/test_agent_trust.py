# ruff: noqa: F811 -- pytest fixtures imported from test_agent are parameters here
"""The agent takes nothing a pod writes as proof: it reads the kernel back.

A forged mark, rules deleted by hand, an agent restart over marked pods, traffic annotations
changed after programming: in each case what counts is what the agent applied to the pod's
current sandbox and what the namespace holds, never the pod's annotations. No admission policy
is installed here, so these tests also show what holds for clusters that turn it off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from test_agent import (  # noqa: F401 -- fixtures shared with the agent's other tests
    ELSEWHERE,
    Cluster,
    agent,
    agent_kubeconfig,
    cluster,
    detail,
    lab,
    meshed_pod,
    status,
    wait_for,
)

from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.iptables import iptables_command
from ipnc_dev.netlab import Netlab
from istio_pod_network_controller import names
from istio_pod_network_controller.node.backend import Family, detect
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import spec_from_pod

pytestmark = pytest.mark.cluster

WAITER_UID = 65532
RESYNC = 2.0  # seconds: drift must be found within one period


def _uid(pod: dict[str, Any]) -> str:
    uid: str = pod["metadata"]["uid"]
    return uid


def _version(cluster: Cluster, name: str) -> str:
    version: str = cluster.get(name)["metadata"]["resourceVersion"]
    return version


def _events(cluster: Cluster, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events() if e["involvedObject"]["name"] == name and e["reason"] == reason]


def _delete_rules(cluster: Cluster, pod: dict[str, Any]) -> None:
    """What an administrator's `iptables -t nat -F` (or another tool's restore) does."""
    tools = detect()
    with Netns(cluster.boxes.by_uid[_uid(pod)].path) as ns:
        for chain in ("OUTPUT", "PREROUTING"):
            done = ns.run([iptables_command(tools, Family.IPV4), "-t", "nat", "-F", chain])
            assert done.ok, done.reason()
    assert "-j ISTIO_OUTPUT" not in cluster.boxes.iptables_save(_uid(pod))


def _intercepted(cluster: Cluster, lab: Netlab, pod: dict[str, Any]) -> bool:
    path = cluster.boxes.by_uid[_uid(pod)].path
    lab.stub_proxy([path], tcp=(15001,))
    answer = lab.probe([path], user=1000).tcp(ELSEWHERE, 80)
    reply = answer.get("reply")
    return bool(answer["ok"]) and isinstance(reply, dict) and reply["orig"] == [ELSEWHERE, 80]


def _forged_detail(pod: dict[str, Any], inode: int, *, with_args: bool) -> str:
    fixed = json.loads(json.dumps(pod))
    fixed["metadata"]["annotations"].pop("traffic.sidecar.istio.io/includeInboundPorts", None)
    spec = spec_from_pod(fixed)
    forged: dict[str, Any] = {
        "netnsInode": inode,
        "rulesetSha256": render(spec).sha256(),
        "appliedAt": "2026-01-01T00:00:00Z",
        "proxyUids": [1337, WAITER_UID],
        "proxyGids": [1337, WAITER_UID],
    }
    if with_args:
        from istio_pod_network_controller.spec.canonical import to_args

        forged["args"] = to_args(spec)
    return json.dumps(forged)


@pytest.mark.parametrize("with_args", [False, True], ids=["forged-mark", "forged-mark-with-args"])
def test_a_forged_mark_does_not_stop_the_agent_from_programming_the_pod(
    cluster: Cluster, agent: AgentProcess, lab: Netlab, with_args: bool
) -> None:
    key = "traffic.sidecar.istio.io/includeInboundPorts"
    bad = meshed_pod("forged", cluster.node, annotations={key: "8O"})
    del bad["spec"]["initContainers"]  # CNI-mode pod: its annotations are the spec
    pod = cluster.create(bad)
    wait_for("error state", lambda: status(cluster.get("forged")) == names.STATUS_ERROR)
    inode = cluster.boxes.inode(_uid(pod))

    # The attack in one merge patch: fix the annotation, claim the agent's mark for this sandbox.
    patch = {"metadata": {"annotations": {
        key: None,
        names.STATUS: names.STATUS_INITIALIZED,
        names.DETAIL: _forged_detail(pod, inode, with_args=with_args),
    }}}  # fmt: skip
    done = cluster.cp.kubectl(
        "patch", "pod", "forged", "-n", cluster.ns, "--type=merge", "-p", json.dumps(patch), check=False
    )
    assert done.returncode == 0, done.stderr

    def programmed_by_the_agent() -> bool:
        info = detail(cluster.get("forged"))
        return "args" in info and info.get("proxyUids") == [1337] and info.get("netnsInode") == inode

    wait_for("the agent's own mark", programmed_by_the_agent, timeout=60)
    assert "-j ISTIO_OUTPUT" in cluster.boxes.iptables_save(_uid(pod))
    assert _intercepted(cluster, lab, pod)


def test_rules_deleted_by_hand_are_back_within_one_resync_and_intact_pods_cause_no_write(
    cluster: Cluster, agent_kubeconfig: Path, lab: Netlab
) -> None:
    proc = AgentProcess(agent_kubeconfig, cluster.node, extra=(f"--resync-seconds={RESYNC:g}",))
    try:
        proc.start().wait_ready()
        victim = cluster.create(meshed_pod("victim", cluster.node))
        cluster.create(meshed_pod("intact", cluster.node))
        wait_for("both initialized", lambda: cluster.initialized(["victim", "intact"]))
        intact_version = _version(cluster, "intact")
        mark = detail(cluster.get("victim"))

        _delete_rules(cluster, victim)
        deleted = time.monotonic()
        wait_for("the rules back", lambda: "-j ISTIO_OUTPUT" in cluster.boxes.iptables_save(_uid(victim)),
                 timeout=RESYNC * 5)  # fmt: skip
        print(f"deleted rules restored after {time.monotonic() - deleted:.2f} s (resync {RESYNC:g} s)")
        assert _intercepted(cluster, lab, victim)
        wait_for("the DriftRepaired Event", lambda: bool(_events(cluster, "victim", "DriftRepaired")))
        event = _events(cluster, "victim", "DriftRepaired")[0]
        assert event["type"] == "Normal" and "missing" in event["message"], event
        assert proc.metric("ipnc_drift_repaired_total") >= 1
        assert "rules drifted" in proc.logs()
        # The sandbox and its rules are the same: the mark stays as it was.
        assert detail(cluster.get("victim"))["rulesetSha256"] == mark["rulesetSha256"]

        time.sleep(RESYNC * 2.5)  # more resyncs: each reads the intact pod back and writes nothing
        assert _version(cluster, "intact") == intact_version
        assert not _events(cluster, "intact", "DriftRepaired")
        assert proc.stop() == 0
    finally:
        proc.close()


def test_a_restarted_agent_reads_marked_pods_back_and_repairs_only_where_needed(
    cluster: Cluster, agent_kubeconfig: Path, lab: Netlab
) -> None:
    first = AgentProcess(agent_kubeconfig, cluster.node)
    second = AgentProcess(agent_kubeconfig, cluster.node)
    try:
        first.start().wait_ready()
        pods = {n: cluster.create(meshed_pod(n, cluster.node)) for n in ("kept", "broken")}
        wait_for("initialized", lambda: cluster.initialized(list(pods)))
        assert first.stop() == 0
        versions = {n: _version(cluster, n) for n in pods}
        _delete_rules(cluster, pods["broken"])

        second.start().wait_ready()  # ready once the first list has been reconciled
        assert "-j ISTIO_OUTPUT" in cluster.boxes.iptables_save(_uid(pods["broken"]))
        assert _intercepted(cluster, lab, pods["broken"])
        wait_for("the DriftRepaired Event", lambda: bool(_events(cluster, "broken", "DriftRepaired")))
        assert _version(cluster, "kept") == versions["kept"]  # intact: not even re-marked
        assert not _events(cluster, "kept", "DriftRepaired")
        assert len(_events(cluster, "kept", "Initialized")) == 1
        assert "rules intact" in second.logs()
        assert second.stop() == 0
    finally:
        first.close()
        second.close()


def test_traffic_annotations_changed_after_programming_wait_for_the_next_sandbox(
    cluster: Cluster, agent_kubeconfig: Path
) -> None:
    key = "traffic.sidecar.istio.io/excludeOutboundPorts"
    proc = AgentProcess(agent_kubeconfig, cluster.node, extra=(f"--resync-seconds={RESYNC:g}",))
    try:
        proc.start().wait_ready()
        body = meshed_pod("bound", cluster.node, annotations={key: "1111"})
        del body["spec"]["initContainers"]
        pod = cluster.create(body)
        wait_for("initialized", lambda: cluster.initialized(["bound"]))
        before = cluster.boxes.iptables_save(_uid(pod))
        assert "--dport 1111" in before

        cluster.cp.kubectl("annotate", "pod", "bound", "-n", cluster.ns, "--overwrite", f"{key}=2222")
        time.sleep(RESYNC * 2.5)  # events and resyncs pass: the sandbox keeps the rules it was made with
        now = cluster.boxes.iptables_save(_uid(pod))
        assert "--dport 1111" in now and "--dport 2222" not in now
        assert not _events(cluster, "bound", "DriftRepaired")

        box = cluster.boxes.recreate(cluster.get("bound"))  # the pod's next sandbox reads them
        inode = Path(box.path).stat().st_ino
        wait_for("the new sandbox programmed", lambda: detail(cluster.get("bound"))["netnsInode"] == inode)
        fresh = cluster.boxes.iptables_save(_uid(pod))
        assert "--dport 2222" in fresh and "--dport 1111" not in fresh
        assert proc.stop() == 0
    finally:
        proc.close()


def test_a_deeply_nested_detail_is_no_mark_and_no_crash(cluster: Cluster, agent: AgentProcess) -> None:
    nested = "[" * 10_000 + "]" * 10_000
    body = meshed_pod("nested", cluster.node, annotations={
        names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: nested,
    })  # fmt: skip
    pod = cluster.create(body)

    def marked() -> bool:  # the forged value is there until the agent writes: not parsed here
        now = cluster.get("nested")
        forged = (now["metadata"].get("annotations") or {}).get(names.DETAIL) == nested
        return not forged and "args" in detail(now)

    wait_for("the agent's own mark", marked)
    assert "-j ISTIO_OUTPUT" in cluster.boxes.iptables_save(_uid(pod))
    logs = agent.logs()
    assert "Traceback" not in logs and "RecursionError" not in logs
    assert agent.metric("controller_runtime_reconcile_errors_total") == 0
