"""The node agent against a real API server and real network namespaces (issue 5's acceptance).

The agent runs as its own process (the real ``run`` command) under the chart's ServiceAccount and
RBAC; pods are created through the API and bound to the agent's node; their sandboxes are real
namespaces in kubelet-style pod cgroups (``testing.sandbox``); traffic goes through the rules.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev import chart
from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.cgroups import KubeletCgroups
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.netlab import Netlab
from ipnc_dev.sandbox import Sandboxes
from istio_pod_network_controller import names
from istio_pod_network_controller.node import tables
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Family, detect
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import spec_from_pod
from istio_pod_network_controller.spec.manifest import load_pod

pytestmark = pytest.mark.cluster

ISTIO_INIT_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                   "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip
ELSEWHERE = "10.96.7.7"  # a service-like address; only ever reached through the pod's own rules
BAD_MANIFESTS = [
    ("traffic-annotations-bad-excludeinboundports.yaml", "traffic.sidecar.istio.io/excludeInboundPorts"),
    ("traffic-annotations-bad-excludeipranges.yaml", "traffic.sidecar.istio.io/excludeOutboundIPRanges"),
    ("traffic-annotations-bad-excludeoutboundports.yaml", "traffic.sidecar.istio.io/excludeOutboundPorts"),
    ("traffic-annotations-bad-includeinboundports.yaml", "traffic.sidecar.istio.io/includeInboundPorts"),
    ("traffic-annotations-bad-includeipranges.yaml", "traffic.sidecar.istio.io/includeOutboundIPRanges"),
]


def meshed_pod(
    name: str, node: str, *, opt_in: bool = True, annotations: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    ann = {names.OPT_IN: "true"} if opt_in else {}
    ann.update(annotations or {})
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": ann},
        "spec": {
            "nodeName": node,
            "initContainers": [{"name": "istio-init", "image": "proxyv2", "args": ISTIO_INIT_ARGS}],
            "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}],
        },
    }
    body["spec"].update(spec)
    return body


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class Cluster:
    """One test's view: its namespace, node, sandboxes, and helpers over kubectl."""

    def __init__(self, cp: ControlPlane, namespace: str, node: str, boxes: Sandboxes) -> None:
        self.cp, self.ns, self.node, self.boxes = cp, namespace, node, boxes

    def create(self, body: dict[str, Any], *, sandbox: bool = True) -> dict[str, Any]:
        done = self.cp.kubectl(
            "create", "-n", self.ns, "-o", "json", "-f", "-", input=json.dumps(body), check=False
        )
        assert done.returncode == 0, done.stderr
        pod: dict[str, Any] = json.loads(done.stdout)
        if sandbox:
            self.boxes.create(pod)
        return pod

    def pods(self) -> dict[str, dict[str, Any]]:
        items = json.loads(self.cp.kubectl("get", "pods", "-n", self.ns, "-o", "json").stdout)["items"]
        return {p["metadata"]["name"]: p for p in items}

    def get(self, name: str) -> dict[str, Any]:
        pod: dict[str, Any] = json.loads(
            self.cp.kubectl("get", "pod", name, "-n", self.ns, "-o", "json").stdout
        )
        return pod

    def events(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(
            self.cp.kubectl("get", "events", "-n", self.ns, "-o", "json").stdout
        )["items"]
        return items

    def initialized(self, names_: list[str]) -> bool:
        pods = self.pods()
        return all(status(pods[n]) == names.STATUS_INITIALIZED for n in names_ if n in pods)


def status(pod: dict[str, Any]) -> str | None:
    value = (pod["metadata"].get("annotations") or {}).get(names.STATUS)
    return value if isinstance(value, str) else None


def detail(pod: dict[str, Any]) -> dict[str, Any]:
    raw = (pod["metadata"].get("annotations") or {}).get(names.DETAIL, "{}")
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


@pytest.fixture(scope="module")
def agent_kubeconfig(control_plane: ControlPlane) -> Path:
    """The chart's agent ServiceAccount, under the chart's RBAC (issue 5 point 7, issue 7 point 3)."""
    control_plane.kubectl("create", "namespace", "istio-pod-network-controller", check=False)
    return chart.agent_kubeconfig(control_plane, "istio-pod-network-controller")


@pytest.fixture
def lab() -> Iterator[Netlab]:
    with Netlab() as net:
        yield net


@pytest.fixture
def cluster(control_plane: ControlPlane, namespace: str, lab: Netlab) -> Iterator[Cluster]:
    with KubeletCgroups() as cgroups:
        boxes = Sandboxes(lab, cgroups, control_plane.kubectl)
        yield Cluster(control_plane, namespace, f"node-{uuid.uuid4().hex[:6]}", boxes)


@pytest.fixture
def agent(agent_kubeconfig: Path, cluster: Cluster) -> Iterator[AgentProcess]:
    proc = AgentProcess(agent_kubeconfig, cluster.node)
    try:
        proc.start().wait_ready()
        yield proc
        assert proc.stop() == 0, proc.logs()[-3000:]  # SIGTERM drains and exits 0
    finally:
        proc.close()


def reference_rules(pod: dict[str, Any], lab: Netlab) -> tables.Owned:
    """The pod's ruleset applied once by a fresh applier into a fresh namespace."""
    tools = detect()
    with Netns(lab.add_isolated(f"ref{uuid.uuid4().hex[:4]}", "10.251.0.250/24")) as ref:
        Applier(tools).apply(ref, render(spec_from_pod(pod)))
        return tables.owned(tables.parse_save(ref.run(tools.save_argv(Family.IPV4)).stdout))


def test_burst_of_opted_in_pods_all_initialized_and_traffic_is_redirected(
    cluster: Cluster, agent: AgentProcess, lab: Netlab
) -> None:
    meshed = [f"mesh-{i}" for i in range(50)]
    for name in meshed:
        cluster.create(meshed_pod(name, cluster.node))
    cluster.create(meshed_pod("not-opted-in", cluster.node, opt_in=False))
    cluster.create(meshed_pod("host-net", cluster.node, hostNetwork=True), sandbox=False)
    for i in range(3):  # pods of another node: the agent must never even receive them
        cluster.create(meshed_pod(f"elsewhere-{i}", "node-other"), sandbox=False)

    wait_for("50 pods initialized", lambda: cluster.initialized(meshed), timeout=180)
    pods = cluster.pods()
    for name in meshed:
        info = detail(pods[name])
        assert info["netnsInode"] == cluster.boxes.inode(pods[name]["metadata"]["uid"])
        assert len(info["rulesetSha256"]) == 64 and info["appliedAt"]
    for name in ("not-opted-in", "host-net", "elsewhere-0", "elsewhere-1", "elsewhere-2"):
        assert status(pods[name]) is None, name
    not_opted = cluster.boxes.iptables_save(pods["not-opted-in"]["metadata"]["uid"])
    assert "ISTIO" not in not_opted
    assert agent.metric("ipnc_pods_watched") == 52  # 50 meshed + not-opted-in + host-net
    assert agent.metric("ipnc_pods_initialized_total") == 50

    # Real traffic from a sample: the app's connection reaches the proxy with its original destination.
    sample = [cluster.boxes.by_uid[pods[n]["metadata"]["uid"]].path for n in meshed[::17]]
    lab.stub_proxy(sample, tcp=(15001,))
    for index, path in enumerate(sample):
        answer = lab.probe([path], user=1000).tcp(ELSEWHERE, 80)  # as the app's UID
        assert answer["ok"], answer
        reply = answer["reply"]
        assert isinstance(reply, dict)
        assert (reply["netns"], reply["port"], reply["orig"]) == (index, 15001, [ELSEWHERE, 80])

    events = [e for e in cluster.events() if e["reason"] == "Initialized"]
    assert sorted(e["involvedObject"]["name"] for e in events) == sorted(meshed)  # once per pod


def test_pods_created_while_the_agent_is_down_are_programmed_when_it_starts(
    cluster: Cluster, agent_kubeconfig: Path
) -> None:
    created = [f"early-{i}" for i in range(5)]
    for name in created:
        cluster.create(meshed_pod(name, cluster.node))
    proc = AgentProcess(agent_kubeconfig, cluster.node)
    try:
        proc.start().wait_ready()  # ready only after the first list has been processed
        assert cluster.initialized(created)
        assert proc.stop() == 0
    finally:
        proc.close()


def test_agent_killed_mid_burst_and_restarted_leaves_every_pod_programmed_once(
    cluster: Cluster, agent_kubeconfig: Path, lab: Netlab
) -> None:
    proc = AgentProcess(agent_kubeconfig, cluster.node, workers=2)
    second = AgentProcess(agent_kubeconfig, cluster.node)
    try:
        proc.start().wait_ready()
        created = [f"burst-{i}" for i in range(30)]
        for i, name in enumerate(created):
            cluster.create(meshed_pod(name, cluster.node))
            if i == 15:
                assert proc.kill(signal.SIGKILL) == -signal.SIGKILL
        second.start().wait_ready()
        wait_for("every pod initialized after the restart", lambda: cluster.initialized(created), timeout=120)
        pods = cluster.pods()
        expected = reference_rules(pods[created[0]], lab)
        for name in created:
            saved = cluster.boxes.iptables_save(pods[name]["metadata"]["uid"])
            assert tables.owned(tables.parse_save(saved)).same_rules(expected), name
            assert status(pods[name]) == names.STATUS_INITIALIZED
        assert second.stop() == 0
    finally:
        proc.close()
        second.close()


def test_no_pod_is_missed_when_the_api_server_restarts_during_creation(
    cluster: Cluster, agent: AgentProcess, control_plane: ControlPlane
) -> None:
    created: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def persist(what: str, action: Callable[[], Any]) -> Any:
        """Retry through the outage (connection refused), for up to a minute."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return action()
            except (AssertionError, subprocess.CalledProcessError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what}: still failing after 60 s") from None
                time.sleep(0.2)

    def create_or_get(name: str) -> dict[str, Any]:
        # A create the server committed but could not answer must not be made twice.
        found = cluster.cp.kubectl("get", "pod", name, "-n", cluster.ns, "-o", "json", check=False)
        if found.returncode == 0:
            pod: dict[str, Any] = json.loads(found.stdout)
            return pod
        return cluster.create(meshed_pod(name, cluster.node), sandbox=False)

    def create_steadily() -> None:  # a client creating pods before, during and after the outage
        try:
            i = 0
            while not stop.is_set() or i < 12:
                name = f"steady-{i}"
                pod = persist(f"create {name}", functools.partial(create_or_get, name))
                box = cluster.boxes.create(pod, report=False)
                persist(f"report {name}'s IP", functools.partial(cluster.boxes.report_ip, pod, box))
                created.append(name)
                i += 1
                time.sleep(0.1)
        except BaseException as exc:
            failures.append(exc)

    creator = threading.Thread(target=create_steadily)
    creator.start()
    try:
        time.sleep(0.5)
        # From this (the main) thread: the harness ties the server's life to the thread that starts it.
        control_plane.restart_apiserver(down_seconds=1.0)
    finally:
        stop.set()
        creator.join(180)
    assert not failures, failures
    assert len(created) >= 12
    wait_for("every pod initialized after the API server restart", lambda: cluster.initialized(created), 120)
    assert agent.metric("ipnc_watch_restarts_total") >= 1


@pytest.mark.parametrize(("manifest", "annotation"), BAD_MANIFESTS, ids=[m for m, _ in BAD_MANIFESTS])
def test_bad_annotations_give_a_warning_and_an_error_state_and_no_rules(
    cluster: Cluster, agent: AgentProcess, shared_dir: Path, manifest: str, annotation: str
) -> None:
    template = load_pod(str(shared_dir / "istio" / "injected" / manifest))
    value = template["metadata"]["annotations"][annotation]
    bad = meshed_pod("bad", cluster.node, annotations={annotation: value})
    del bad["spec"]["initContainers"]  # CNI-mode pod: its annotations are the spec
    pod = cluster.create(bad)
    wait_for("error state", lambda: status(cluster.get("bad")) == names.STATUS_ERROR)
    info = detail(cluster.get("bad"))
    assert annotation in info["error"] and info["reason"] == "InvalidConfiguration"
    warnings = [
        e for e in cluster.events() if e["type"] == "Warning" and e["involvedObject"]["name"] == "bad"
    ]
    assert warnings and warnings[0]["reason"] == "InvalidConfiguration"
    assert annotation in warnings[0]["message"]
    assert "ISTIO" not in cluster.boxes.iptables_save(pod["metadata"]["uid"])

    # The agent keeps serving: a good pod created afterwards is programmed.
    cluster.create(meshed_pod("good", cluster.node))
    wait_for("the good pod initialized", lambda: cluster.initialized(["good"]))
    assert len([e for e in cluster.events() if e["involvedObject"]["name"] == "bad"]) == 1  # said once


def test_fixing_a_bad_annotation_initializes_the_pod_without_recreating_it(
    cluster: Cluster, agent: AgentProcess
) -> None:
    key = "traffic.sidecar.istio.io/includeInboundPorts"
    bad = meshed_pod("fixme", cluster.node, annotations={key: "8O"})
    del bad["spec"]["initContainers"]
    cluster.create(bad)
    wait_for("error state", lambda: status(cluster.get("fixme")) == names.STATUS_ERROR)
    cluster.cp.kubectl("annotate", "pod", "fixme", "-n", cluster.ns, "--overwrite", f"{key}=80")
    wait_for("initialized after the fix", lambda: cluster.initialized(["fixme"]))


def test_recreated_sandbox_is_programmed_again(cluster: Cluster, agent: AgentProcess) -> None:
    pod = cluster.create(meshed_pod("phoenix", cluster.node))
    wait_for("initialized", lambda: cluster.initialized(["phoenix"]))
    first = detail(cluster.get("phoenix"))["netnsInode"]
    started = time.monotonic()
    box = cluster.boxes.recreate(pod)
    new_inode = Path(box.path).stat().st_ino
    assert new_inode != first
    wait_for("the new sandbox programmed", lambda: detail(cluster.get("phoenix"))["netnsInode"] == new_inode)
    print(f"recreated sandbox programmed again after {time.monotonic() - started:.2f} s")
    assert "ISTIO_OUTPUT" in cluster.boxes.iptables_save(pod["metadata"]["uid"])
