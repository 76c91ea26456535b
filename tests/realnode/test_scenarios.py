"""Life on real nodes: an agent killed mid-burst, containerd and the kubelet restarted, a sandbox
recreated, a node drained, the chart upgraded while pods start, the chart uninstalled.

One cluster of two real nodes for the module, the chart installed from our image, Istio's
injected ``hello`` Deployment meshed in a ``restricted`` namespace, and one pod in a namespace
that did not opt in. The scenarios run in this file's order, the uninstall last. Each starts from
a healthy cluster (checked, so that one scenario's failure is not blamed on the next) and ends
with ``settled.wait_settled``: every meshed pod Running and programmed exactly once for the
sandbox it runs in now -- the mark names that sandbox's network namespace, the waiter passed for
it, one copy of our rules in it, one Initialized Event for it, each agent's counter equal to its
log -- no Warning of ours during the scenario, one agent process per node, and no rule of ours in
the pod that did not opt in.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from ipnc_dev import chart
from ipnc_dev.realnode import RealCluster, RealClusterError, artifacts, install, mesh, settled, workload
from ipnc_dev.realnode.cluster import Node, Sandbox
from ipnc_dev.realnode.processes import wait_until
from istio_pod_network_controller import names

from .conftest import needs_root, shared_injected, timings

pytestmark = pytest.mark.realnode

DEPLOYMENT = "hello"
SOURCE = ("hello.yaml.injected", 4)
BURST = 6
STEP_TIMEOUT = 60.0
# A pod whose downward-API file the kubelet refreshes only at its next periodic sync waits up to
# 90 s after its mark: the start of a scenario allows for one.
HEALTHY_TIMEOUT = 120.0
INODE_ATTEMPTS = 3


@dataclass
class Scene:
    cluster: RealCluster
    release: install.Release
    replicas: int
    plain: list[mesh.PodView]
    seconds: dict[str, float] = field(default_factory=dict)

    def meshed(self) -> list[mesh.PodView]:
        return mesh.pods(self.cluster, workload.NAMESPACE)

    def agent(self, node: str) -> mesh.PodView:
        agents = [
            p
            for p in mesh.pods(
                self.cluster, self.release.namespace, labels={"app.kubernetes.io/component": "agent"}
            )
            if p.node == node and not p.deleting
        ]
        assert len(agents) == 1, f"{len(agents)} agent pods on {node}: {[a.name for a in agents]}"
        return agents[0]

    def scale(self, replicas: int) -> None:
        self.cluster.kubectl(
            "-n", workload.NAMESPACE, "scale", "deployment", DEPLOYMENT, f"--replicas={replicas}"
        )
        self.replicas = replicas

    def replace(self, pods: list[mesh.PodView]) -> None:
        """Delete ``pods`` without waiting: their Deployment starts new ones at once."""
        self.cluster.kubectl(
            "-n", workload.NAMESPACE, "delete", "pod", "--wait=false", *(p.name for p in pods)
        )

    def settle(self, since: datetime) -> settled.Facts:
        mesh.wait_running(self.cluster, workload.NAMESPACE, self.replicas, timeout=120)
        return settled.wait_settled(
            self.cluster,
            self.release,
            workload.NAMESPACE,
            expected_pods=self.replicas,
            warnings_since=since,
            unmeshed=self.plain,
        )

    def healthy(self) -> None:
        """The start of every scenario: both nodes Ready, one ready agent each, every meshed pod
        Running and marked (the previous scenario's full check is not repeated)."""
        problems: list[str] = []

        def check() -> bool:
            problems.clear()
            ready = self.cluster.ready_nodes()
            problems.extend(f"{n.name} not Ready" for n in self.cluster.nodes if n.name not in ready)
            for n in self.cluster.nodes:
                try:
                    agent = self.agent(n.name)
                except AssertionError as e:
                    problems.append(str(e))
                    continue
                if not agent.ready:
                    problems.append(f"{agent.name} not ready")
            for p in self.meshed():
                if not (
                    p.phase == "Running"
                    and p.ready
                    and p.annotations.get(names.STATUS) == names.STATUS_INITIALIZED
                ):
                    problems.append(
                        f"{p.name}: {p.phase}, ready={p.ready}, {p.annotations.get(names.STATUS)}"
                    )
            return not problems

        if not wait_until(check, HEALTHY_TIMEOUT, interval=1.0):
            pytest.fail(
                "the cluster is not healthy at the start of this scenario:\n  " + "\n  ".join(problems)
            )


def _now() -> datetime:
    # Event times have whole seconds: a scenario's window starts at the second it started in.
    return datetime.now(UTC).replace(microsecond=0)


def _wait(
    what: str, predicate: Callable[[], bool], timeout: float = STEP_TIMEOUT, *, interval: float = 0.2
) -> None:
    if not wait_until(predicate, timeout, interval=interval):
        pytest.fail(f"{what}: not within {timeout:g} s")


def _new_sandbox(scene: Scene, node: Node, pod_uid: str, replaced: Sandbox) -> bool:
    """The pod has a ready sandbox, and it is not ``replaced``."""
    listed = scene.cluster.crictl(
        node, "pods", "--label", f"io.kubernetes.pod.uid={pod_uid}", "--state", "ready", "-q"
    )
    return listed.returncode == 0 and bool(listed.stdout.split()) and replaced.id not in listed.stdout


def _recreate_sandbox(
    scene: Scene, node: Node, pod_uid: str, name: str, sandbox: Sandbox, steer: AbstractContextManager[object]
) -> None:
    """Stop ``sandbox`` while the kubelet is held, then let it make a new one inside ``steer``
    (which decides the new namespace's inode number), and wait until it is ready."""
    scene.cluster.pause_kubelet(node)
    try:
        scene.cluster.stop_sandbox(node, sandbox.id)
        with steer:
            scene.cluster.resume_kubelet(node)
            _wait(f"a new sandbox for {name}", functools.partial(_new_sandbox, scene, node, pod_uid, sandbox))
    finally:
        scene.cluster.resume_kubelet(node)


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    needs_root()
    injected = shared_injected()
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    seconds: dict[str, float] = {}
    archives = (artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE, artifacts.STUB_ARCHIVE)
    try:
        with RealCluster(nodes=2, image_archives=archives) as cluster:
            assert cluster.images is not None
            release = install.install(cluster)
            plain = chart.dump(workload.plain_objects(cluster.images.busybox))
            cluster.kubectl("apply", "-f", "-", input=plain)
            replicas = mesh.deploy(cluster, injected, sources=[SOURCE])
            mesh.wait_running(cluster, workload.PLAIN_NAMESPACE, len(cluster.nodes))
            scene = Scene(cluster, release, replicas, mesh.pods(cluster, workload.PLAIN_NAMESPACE), seconds)
            scene.settle(_now())
            marks["ready"] = time.monotonic()
            yield scene
            marks["done"] = time.monotonic()
    finally:
        # Also when teardown or its host check fails: the figures are what a slow run needs.
        end = time.monotonic()
        each = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
        timings.append(
            f"real-node scenarios: cluster, chart and {SOURCE[1]} meshed pods "
            f"{marks.get('ready', end) - t0:.1f} s; {each}; "
            f"teardown and host check {end - marks.get('done', end):.1f} s; {end - t0:.1f} s in all"
        )


@pytest.fixture(autouse=True)
def timed(request: pytest.FixtureRequest, scene: Scene) -> Iterator[None]:
    scene.healthy()
    t = time.monotonic()
    yield
    scene.seconds[request.node.name.removeprefix("test_")[:40]] = time.monotonic() - t


# -- the scenarios, in order -------------------------------------------------------------------------


def test_agent_killed_mid_burst_programs_every_pod_once(scene: Scene) -> None:
    since = _now()
    node = scene.cluster.node("node-1")
    before = {p.uid for p in scene.meshed()}
    agent = scene.agent(node.name)
    restarts = agent.containers["agent"].restarts
    scene.scale(scene.replicas + BURST)

    def in_flight() -> bool:
        # A pod of the burst whose sandbox is up (the kubelet reported its IP, which is what the
        # agent waits for) and that has no mark yet: the agent is at it, or about to be.
        return any(
            p.ip and p.annotations.get(names.STATUS) != names.STATUS_INITIALIZED
            for p in scene.meshed()
            if p.uid not in before and p.node == node.name
        )

    _wait("a pod of the burst on node-1 with its sandbox up and no mark yet", in_flight, interval=0.05)
    # SIGKILL, as a crash or the OOM killer would: no drain, no goodbye.
    scene.cluster.signal_container(node, agent.uid, "agent", signal.SIGKILL)
    facts = scene.settle(since)

    assert scene.agent(node.name).containers["agent"].restarts == restarts + 1, "the agent was killed once"
    (restarted,) = [a for a in facts.agents if a.node == node.name]
    burst = {f.pod.uid for f in facts.pods if f.pod.uid not in before and f.pod.node == node.name}
    assert {uid for uid, _ in settled.agent_marks(restarted.log)} & burst, (
        "the restarted agent marked no pod of the burst: the kill was not mid-burst"
    )


def test_recreated_sandbox_is_reprogrammed_and_its_stale_mark_refused(scene: Scene) -> None:
    since = _now()
    node = scene.cluster.node("node-2")
    pod = next(p for p in scene.meshed() if p.node == node.name)
    old = scene.cluster.sandbox(node, pod.uid)
    agent = scene.agent(node.name)
    stale = f"for network namespace {old.netns_inode}, an earlier sandbox"
    waiter_log: list[str] = []

    def waiter_refuses() -> bool:
        with scene.cluster.client() as client:
            try:
                text = "".join(
                    client.log(pod.name, namespace=workload.NAMESPACE, container=names.WAITER_CONTAINER)
                )
            except Exception:  # no waiter of the new sandbox yet
                return False
        waiter_log[:] = [text]
        return stale in text

    # The agent is held (SIGSTOP) while the sandbox is replaced, so that the new sandbox's waiter
    # surely meets the mark of the old one; well within the agent's liveness allowance. The
    # kubelet is held until the old sandbox's inode number is ours, so that the new sandbox
    # gets another (the case of the same number is the next scenario's).
    pid = scene.cluster.signal_container(node, agent.uid, "agent", signal.SIGSTOP)
    try:
        held = scene.cluster.netns_inode_held(old.netns_inode)
        _recreate_sandbox(scene, node, pod.uid, pod.name, old, held)
        what = f"the new sandbox's waiter of {pod.name} refusing the mark for {old.netns_inode}"
        if not wait_until(waiter_refuses, 20.0, interval=0.2):
            try:
                current = f"the pod's sandbox now: {scene.cluster.sandbox(node, pod.uid)}"
            except RealClusterError as e:
                current = str(e)
            pytest.fail(
                f"{what}: not within 20 s ({current}); the waiter's log:\n{''.join(waiter_log) or '(none)'}"
            )
    finally:
        scene.cluster.signal_pid(node, pid, signal.SIGCONT)
    facts = scene.settle(since)

    new = scene.cluster.sandbox(node, pod.uid)
    assert new.id != old.id and new.netns_inode != old.netns_inode
    (now,) = [f.pod for f in facts.pods if f.pod.uid == pod.uid]
    assert now.detail["netnsInode"] == new.netns_inode
    # The kubelet counts runs across sandboxes: one more run, the new sandbox's, which passed.
    waiter = now.container(names.WAITER_CONTAINER)
    assert waiter.restarts == pod.container(names.WAITER_CONTAINER).restarts + 1, waiter
    events = settled.initialized_events(facts.events)
    assert events.get((pod.uid, old.netns_inode)) == 1 and events.get((pod.uid, new.netns_inode)) == 1, events
    assert scene.agent(node.name).containers["agent"].restarts == agent.containers["agent"].restarts


def test_new_sandbox_given_the_old_inode_number_does_not_pass_on_the_old_mark(scene: Scene) -> None:
    """The kernel hands out the lowest free inode number to a new namespace, so a pod's new
    sandbox can get the very number its old one had (about one ``crictl stopp`` in four did here,
    unaided). The harness makes that happen for sure; the old sandbox's mark must still not let
    the new sandbox's waiter pass."""
    since = _now()
    node = scene.cluster.node("node-1")
    pod = next(p for p in scene.meshed() if p.node == node.name)
    old = scene.cluster.sandbox(node, pod.uid)
    runs = pod.container(names.WAITER_CONTAINER).restarts
    agent = scene.agent(node.name)
    verdict: list[str] = []
    tried: list[int] = []  # the inode numbers the new sandboxes got

    def first_verdict() -> bool:
        # The new sandbox's waiter (one more run) and the first line it wrote after its header.
        (now,) = [p for p in scene.meshed() if p.uid == pod.uid]
        if now.container(names.WAITER_CONTAINER).restarts != runs + len(tried):
            return False
        with scene.cluster.client() as client:
            text = "".join(
                client.log(pod.name, namespace=workload.NAMESPACE, container=names.WAITER_CONTAINER)
            )
        lines = text.splitlines()[1:]
        verdict[:] = [text]
        return bool(lines)

    # Both the agent and the kubelet are held: the agent so that only the waiter decides, the
    # kubelet so that the new sandbox is made only once the old one's number is free again.
    pid = scene.cluster.signal_container(node, agent.uid, "agent", signal.SIGSTOP)
    try:
        current = old
        for _ in range(INODE_ATTEMPTS):  # someone else on the machine may take the number first
            steered = scene.cluster.next_netns_inode(old.netns_inode)
            _recreate_sandbox(scene, node, pod.uid, pod.name, current, steered)
            current = scene.cluster.sandbox(node, pod.uid)
            tried.append(current.netns_inode)
            if current.netns_inode == old.netns_inode:
                break
        assert current.netns_inode == old.netns_inode, f"new sandboxes got {tried}, never {old.netns_inode}"
        _wait(f"the first word of the new sandbox's waiter of {pod.name}", first_verdict, timeout=30.0)
        assert "waiting: " in verdict[0].splitlines()[1], (
            f"the new sandbox's waiter (network namespace inode {current.netns_inode}, the number the old "
            f"sandbox had) did not wait for the agent:\n{verdict[0]}"
        )
    finally:
        scene.cluster.signal_pid(node, pid, signal.SIGCONT)
        # This pod had two sandboxes of one inode number, which its Events cannot tell apart: it
        # is replaced, pass or fail, before the cluster is judged (here or by the next scenario).
        scene.replace([pod])
    scene.settle(since)


def test_containerd_restarted_while_pods_start(scene: Scene) -> None:
    since = _now()
    node = scene.cluster.node("node-1")
    scene.replace([p for p in scene.meshed() if p.node == node.name][:2])
    scene.cluster.restart_containerd(node)
    scene.settle(since)


def test_kubelet_restarted_while_pods_start(scene: Scene) -> None:
    since = _now()
    node = scene.cluster.node("node-2")
    scene.replace([p for p in scene.meshed() if p.node == node.name][:2])
    scene.cluster.restart_kubelet(node)
    scene.settle(since)


def test_drained_node_pods_are_programmed_where_they_land(scene: Scene) -> None:
    since = _now()
    node = scene.cluster.node("node-2")
    moved = [p.uid for p in scene.meshed() if p.node == node.name]
    assert moved, "no meshed pod on node-2 to drain"
    try:
        scene.cluster.drain(node)
        facts = scene.settle(since)
        assert {f.pod.node for f in facts.pods} == {"node-1"}
        assert not {f.pod.uid for f in facts.pods} & set(moved)
    finally:
        scene.cluster.uncordon(node)


def test_chart_upgraded_while_pods_start(scene: Scene) -> None:
    since = _now()
    agents = {scene.agent(n.name).name for n in scene.cluster.nodes}
    install.upgrade(scene.cluster, scene.release, {"logLevel": "debug"})
    scene.replace(scene.meshed()[:3])
    scene.scale(scene.replicas + 2)
    install.wait_rolled_out(scene.cluster, scene.release)
    scene.settle(since)
    now = {scene.agent(n.name).name for n in scene.cluster.nodes}
    assert not now & agents, f"the agents were not replaced by the upgrade: {sorted(now)}"


def test_chart_uninstalled_leaves_nothing_of_ours(scene: Scene) -> None:
    before = install.installed(scene.cluster, scene.release)
    kinds = {kind for kind, _, _ in before.objects}
    assert {"MutatingWebhookConfiguration", "ValidatingAdmissionPolicy", "DaemonSet"} <= kinds, kinds
    install.uninstall(scene.cluster, scene.release)
    assert install.leftovers(scene.cluster, scene.release, before) == []
    for pod in scene.plain:
        assert not any(settled.rules_of(scene.cluster, pod).values()), pod.name
    # Pods already meshed run on: their rules stay with them, as after any agent stops.
    pods = scene.meshed()
    assert len(pods) == scene.replicas and all(p.phase == "Running" and p.ready for p in pods)
