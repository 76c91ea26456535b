"""A kubelet that loses the update carrying the mark: the agent writes the mark again, and the
waiter is let go within seconds instead of at the kubelet's next periodic sync.

The node stand-in rewrites a pod's downward API files on every change of the pod. Here it is made
to behave as a real kubelet whose remount was lost: the first write that would show the agent's
mark is skipped, and so is every later one while the annotations stay exactly those (a real
kubelet rewrites the file only when the annotations change again, or at its periodic sync, which
the stand-in does not have). The real agent (its own process, the chart's RBAC) and the real
waiter (``--verify``) do the rest.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from test_waiter_e2e import _needs_root, api_pod, running

from ipnc_dev import chart
from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.standin import NodeStandIn, PodView
from istio_pod_network_controller import names
from istio_pod_network_controller.inject import Patch, WaiterSettings, mutate_pod
from istio_pod_network_controller.refresh import DETAIL_KEY

pytestmark = pytest.mark.cluster

W = names.WAITER_CONTAINER
WAITER = WaiterSettings(image="registry.example/istio-pod-network-controller:test", timeout=60, verify=True)
ISTIO_INIT_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                   "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip
PODS = 3
# The first nudge comes 2 s after the mark (the agent's default); the waiter must be let go well
# before its own 60 s timeout, and long before a kubelet's periodic sync (60 to 90 s).
LET_GO_WITHIN = 15.0


class LosingKubelet:
    """Skips the stand-in's downward API writes as a kubelet that lost the mark's update does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lost: dict[str, Mapping[str, Any]] = {}  # pod UID -> the annotations not written
        self.lost_at: dict[str, float] = {}
        self.written_after: dict[str, float] = {}  # pod UID -> when a write went through again

    def wrap(self, refresh: Any) -> Any:
        def refresh_downward(pod: Any) -> None:
            annotations = dict((pod.obj.get("metadata") or {}).get("annotations") or {})
            with self.lock:
                lost = self.lost.get(pod.uid)
                if lost is None and annotations.get(names.STATUS) == names.STATUS_INITIALIZED:
                    self.lost[pod.uid], self.lost_at[pod.uid] = annotations, time.monotonic()
                    return
                if lost is not None and annotations == lost:
                    return  # nothing changed since the lost update: nothing rewrites the file
                if lost is not None:
                    self.written_after.setdefault(pod.uid, time.monotonic())
            refresh(pod)

        return refresh_downward


def injected_pod(name: str, node: str) -> dict[str, Any]:
    """A meshed pod as the webhook would admit it: istio-init turned into the waiter."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": {names.OPT_IN: "true"}},
        "spec": {
            "nodeName": node,
            "initContainers": [{"name": "istio-init", "image": "proxyv2", "args": ISTIO_INIT_ARGS}],
            "containers": [
                {"name": "app", "image": "app"},
                {"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"]},
            ],
        },
    }
    mutation = mutate_pod(pod, None, WAITER)
    assert isinstance(mutation, Patch), mutation
    return _apply(pod, mutation.ops)


def _apply(doc: dict[str, Any], ops: Any) -> dict[str, Any]:
    """The webhook's JSON patch (add and remove are all it uses)."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in op["path"][1:].split("/")]
        target: Any = out
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if op["op"] == "add" and isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif op["op"] == "add":
            target[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        else:
            raise AssertionError(f"unexpected op {op['op']}")
    return out


@pytest.fixture
def losing() -> LosingKubelet:
    return LosingKubelet()


@pytest.fixture
def node(control_plane: ControlPlane, losing: LosingKubelet) -> Iterator[NodeStandIn]:
    _needs_root()
    standin = NodeStandIn(
        f"node-{uuid.uuid4().hex[:8]}", control_plane.kubeconfig_path, backoff_initial=0.2, backoff_max=0.8,
        stop_timeout=3.0,
    )  # fmt: skip
    volumes = standin._volumes
    volumes.refresh_downward = losing.wrap(volumes.refresh_downward)  # type: ignore[method-assign]
    with standin:
        yield standin


@pytest.fixture(scope="module")
def agent_kubeconfig(control_plane: ControlPlane) -> Path:
    control_plane.kubectl("create", "namespace", "istio-pod-network-controller", check=False)
    return chart.agent_kubeconfig(control_plane, "istio-pod-network-controller")


@pytest.fixture
def agent(agent_kubeconfig: Path, node: NodeStandIn) -> Iterator[AgentProcess]:
    # Without the hand-off: the waiters here must wait for their file, whose update is lost.
    proc = AgentProcess(agent_kubeconfig, node.node_name, extra=("--no-mark-handoff",))
    try:
        yield proc.start()
    finally:
        if proc.popen is not None and proc.popen.poll() is None:
            proc.stop()
        proc.close()


def test_a_lost_update_of_the_mark_is_made_good_by_the_agent_within_seconds(
    control_plane: ControlPlane, kube: Any, namespace: str, node: NodeStandIn, agent: AgentProcess,
    losing: LosingKubelet,
) -> None:  # fmt: skip
    agent.wait_ready()
    pods = [injected_pod(f"late-{i}", node.node_name) for i in range(PODS)]
    for pod in pods:
        pod["metadata"]["namespace"] = namespace
        control_plane.kubectl("create", "-f", "-", input=json.dumps(pod))
    views: dict[str, PodView] = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        views[name] = node.wait_for(namespace, name, running, timeout=LET_GO_WITHIN + 30)
    let_go = time.monotonic()
    for name, view in views.items():
        waiter = view.container(W)
        assert waiter.exit_codes == (0,), node.logs(view.uid, W)
        # The mark's own update was lost for every pod, and a later change of the annotations
        # (the agent's nudge) rewrote the file within the allowance.
        assert view.uid in losing.lost, name
        assert view.uid in losing.written_after, name
        assert losing.written_after[view.uid] - losing.lost_at[view.uid] < LET_GO_WITHIN, name
        assert let_go - losing.lost_at[view.uid] < LET_GO_WITHIN + 5, name
        # What let it go: the agent's mark, written again for this very sandbox.
        annotations = api_pod(kube, namespace, name)["metadata"]["annotations"]
        detail = json.loads(annotations[names.DETAIL])
        assert annotations[names.STATUS] == names.STATUS_INITIALIZED
        assert detail["netnsInode"] == view.netns_inode
        assert detail[DETAIL_KEY] >= 1
        last = node.logs(view.uid, W).strip().splitlines()[-1]
        assert f"pod initialized for network namespace {view.netns_inode}" in last, last
    nudges = agent.metric("ipnc_mark_refresh_nudges_total")
    assert PODS <= nudges <= 3 * PODS  # at least one per pod, never more than the budget
