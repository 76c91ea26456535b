"""The waiter end to end (issue 6, acceptance 2-4): Istio-injected pods go through the real
webhook (under the chart's RBAC) into a `restricted`, opted-in namespace, the node stand-in runs
them as a kubelet would (the waiter as UID 65532, with `--verify`), and the real agent (under the
chart's RBAC) programs their namespaces.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from lightkube import Client
from lightkube.resources.core_v1 import Namespace, Pod
from lightkube.types import PatchType

from ipnc_dev import chart
from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.standin import NodeStandIn, PodView
from ipnc_dev.webhookproc import WebhookProcess, webhook_kubeconfig
from istio_pod_network_controller import names
from istio_pod_network_controller.render import Ruleset

pytestmark = pytest.mark.cluster

WAITER_IMAGE = "registry.example/istio-pod-network-controller:test"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
CONTAINER_RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
ELSEWHERE = "192.0.2.10"  # reached only through the pod's own rules (the stand-in has no uplink)
W = names.WAITER_CONTAINER


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the node stand-in needs root (network namespaces, cgroups)")
    for binary in ("ip", "nsenter", "setpriv", "iptables"):
        if shutil.which(binary) is None:
            pytest.skip(f"the node stand-in needs {binary}")


def eventually(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}; last: {value!r}")
        time.sleep(0.05)


def hello_pod(
    shared_dir: Path, namespace: str, name: str, node: str, *, istio_init: bool = True
) -> dict[str, Any]:
    """Istio's injected hello pod, its application side made `restricted` compliant."""
    doc = next(
        d for d in yaml.safe_load_all((shared_dir / "istio/injected/hello.yaml.injected").read_text()) if d
    )
    template = doc["spec"]["template"]
    spec = copy.deepcopy(template["spec"])
    spec.setdefault("securityContext", {})["seccompProfile"] = {"type": "RuntimeDefault"}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        if not container.get("securityContext"):
            container["securityContext"] = copy.deepcopy(CONTAINER_RESTRICTED)
    if not istio_init:  # as Istio's CNI-mode injection leaves it (less its validation container)
        spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "istio-init"]
    spec["serviceAccountName"] = "default"
    spec["nodeName"] = node
    metadata = {
        k: v for k, v in copy.deepcopy(template["metadata"]).items() if k in ("labels", "annotations")
    }
    metadata.update(name=name, namespace=namespace)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def api_pod(kube: Client, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kube.get(Pod, name, namespace=namespace).to_dict()
    return found


def annotations_of(pod: dict[str, Any]) -> dict[str, str]:
    return cast(dict[str, str], pod["metadata"].get("annotations") or {})


def running(view: PodView) -> bool:
    return view.phase == "Running" and all(c.ready for c in view.containers.values() if not c.init)


def rules_sha256(args: list[str]) -> str:
    """The ruleset `rules` prints for istio-init's arguments, as the agent hashes it."""
    flags = args[1:] if args[:1] == ["istio-iptables"] else args
    argv = [sys.executable, "-m", "istio_pod_network_controller.cli", "rules", *flags, "--output", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)  # noqa: S603
    printed = json.loads(done.stdout)
    return Ruleset.from_restore_text(printed["iptables"], printed["ip6tables"]).sha256()


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def node(control_plane: ControlPlane) -> Iterator[NodeStandIn]:
    _needs_root()
    standin = NodeStandIn(
        f"node-{uuid.uuid4().hex[:8]}",
        control_plane.kubeconfig_path,
        backoff_initial=0.2,
        backoff_max=0.8,
        stop_timeout=3.0,
    )
    with standin:
        yield standin


@pytest.fixture
def meshed_namespace(kube: Client, namespace: str) -> str:
    labels = {**RESTRICTED, names.OPT_IN: names.OPT_IN_VALUE}
    kube.patch(Namespace, namespace, {"metadata": {"labels": labels}}, patch_type=PatchType.MERGE)
    return namespace


@pytest.fixture
def webhook(control_plane: ControlPlane, meshed_namespace: str, tmp_path: Path) -> Iterator[WebhookProcess]:
    kubeconfig = webhook_kubeconfig(control_plane, f"{meshed_namespace}-ipnc", tmp_path / "kubeconfig")
    extra = [f"--waiter-image={WAITER_IMAGE}", "--waiter-verify", "--waiter-timeout=60"]
    process = WebhookProcess(kubeconfig, extra=extra, folder=tmp_path).start()
    config = process.configuration(f"ipnc-e2e-{meshed_namespace}", [meshed_namespace])
    try:
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(config))
        yield process
    finally:
        control_plane.kubectl(
            "delete", "mutatingwebhookconfiguration", config["metadata"]["name"], check=False
        )
        process.stop()


@pytest.fixture(scope="module")
def agent_kubeconfig(control_plane: ControlPlane) -> Path:
    control_plane.kubectl("create", "namespace", "istio-pod-network-controller", check=False)
    return chart.agent_kubeconfig(control_plane, "istio-pod-network-controller")


@pytest.fixture
def agent(agent_kubeconfig: Path, node: NodeStandIn) -> Iterator[AgentProcess]:
    """The real agent for the stand-in's node; not started (each test decides when)."""
    proc = AgentProcess(agent_kubeconfig, node.node_name)
    try:
        yield proc
    finally:
        if proc.popen is not None and proc.popen.poll() is None:
            proc.stop()
        proc.close()


def create_through_webhook(kube: Client, pod: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
    """Create the pod once the webhook configuration is in effect (a pod that went through it
    carries the waiter; one created too early is deleted and created again)."""
    deadline = time.monotonic() + timeout
    while True:
        created: dict[str, Any] = kube.create(cast(Pod, Pod.from_dict(copy.deepcopy(pod)))).to_dict()
        inits = created["spec"].get("initContainers") or []
        if inits and inits[0]["name"] == W and inits[0].get("image") == WAITER_IMAGE:
            return created
        kube.delete(Pod, pod["metadata"]["name"], namespace=pod["metadata"]["namespace"], grace_period=0)
        assert time.monotonic() < deadline, "the MutatingWebhookConfiguration never took effect"
        eventually(
            "the early pod gone", lambda: not kube.list(Pod, namespace=pod["metadata"]["namespace"]), 20
        )
        time.sleep(0.2)


# -- acceptance 2 --------------------------------------------------------------------------------------


def test_the_waiter_holds_the_pod_until_the_agent_has_programmed_it_then_traffic_is_redirected(
    kube: Client, shared_dir: Path, node: NodeStandIn, webhook: WebhookProcess, agent: AgentProcess,
    meshed_namespace: str,
) -> None:  # fmt: skip
    pod = hello_pod(shared_dir, meshed_namespace, "hello", node.node_name)
    istio_init_args = next(c["args"] for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    create_through_webhook(kube, pod)

    # No agent yet: the waiter runs and holds the proxy and the application back.
    view = node.wait_for(meshed_namespace, "hello", lambda v: v.container(W).state == "running")
    time.sleep(1.0)
    view = node.wait_for(meshed_namespace, "hello")
    assert view.container(W).state == "running" and view.container(W).exit_codes == ()
    assert view.container("istio-proxy").state == "waiting" and view.container("hello").state == "waiting"
    assert names.STATUS not in annotations_of(api_pod(kube, meshed_namespace, "hello"))

    agent.start().wait_ready()
    view = node.wait_for(meshed_namespace, "hello", running, timeout=60)
    waiter = view.container(W)
    assert waiter.exit_codes == (0,), node.logs(view.uid, W)
    last = node.logs(view.uid, W).strip().splitlines()[-1]
    assert last.startswith(
        f"istio-pod-network-controller init: pod initialized for network namespace {view.netns_inode}"
        ", mark handed over by the agent"  # inside the pod's namespace, before the kubelet's file
    )
    assert last.endswith("outbound redirect proven: 192.0.2.1:80 reached the proxy port 15001"), last

    # The mark names this sandbox and the ruleset `rules` gives for istio-init's own arguments.
    annotations = annotations_of(api_pod(kube, meshed_namespace, "hello"))
    assert annotations[names.STATUS] == names.STATUS_INITIALIZED
    detail = json.loads(annotations[names.DETAIL])
    assert detail["netnsInode"] == view.netns_inode
    assert json.loads(annotations[names.IPTABLES_ARGS]) == istio_init_args
    assert detail["rulesetSha256"] == rules_sha256(istio_init_args)

    # The listener of the hand-off closed once the kubelet reported the waiter done, counted served.
    served = 'ipnc_mark_handoffs_total{result="served"} 1.0'
    eventually("the hand-off counted served", lambda: served in agent.get("/metrics")[1])

    # Real traffic from the application reaches the proxy with its original destination.
    answer = node.app_request(view.uid, "hello", ELSEWHERE, 80)
    assert answer["ok"], answer
    reply = answer["reply"]
    assert (reply["server"], reply["port"], reply["orig"]) == ("istio-proxy", 15001, [ELSEWHERE, 80])


# -- acceptance 3 --------------------------------------------------------------------------------------


def test_a_bad_annotation_is_shown_by_the_waiter_and_fixing_it_starts_the_same_pod(
    kube: Client, shared_dir: Path, node: NodeStandIn, webhook: WebhookProcess, agent: AgentProcess,
    meshed_namespace: str,
) -> None:  # fmt: skip
    bad = "traffic.sidecar.istio.io/includeInboundPorts"
    pod = hello_pod(shared_dir, meshed_namespace, "bad", node.node_name, istio_init=False)
    pod["metadata"]["annotations"][bad] = "http"
    created = create_through_webhook(kube, pod)  # admitted: the agent reports it, on the pod
    agent.start().wait_ready()

    reason = f"the node agent could not program this pod: {bad}: invalid value 'http'"

    def waiter_said_it() -> bool:
        view = node.find(meshed_namespace, "bad")
        return view is not None and any(
            reason in path.read_text(errors="replace") for path in view.container(W).log_paths
        )

    eventually("the waiter's line with the agent's reason", waiter_said_it, 30)
    view = node.wait_for(meshed_namespace, "bad", lambda v: 1 in v.container(W).exit_codes, timeout=60)
    assert view.container("hello").state == "waiting"
    assert annotations_of(api_pod(kube, meshed_namespace, "bad"))[names.STATUS] == names.STATUS_ERROR

    kube.patch(Pod, "bad", {"metadata": {"annotations": {bad: "*"}}}, namespace=meshed_namespace,
               patch_type=PatchType.MERGE)  # fmt: skip
    view = node.wait_for(meshed_namespace, "bad", running, timeout=60)
    assert view.uid == created["metadata"]["uid"]  # the same pod, not a new one
    assert view.container(W).exit_codes[-1] == 0
    assert annotations_of(api_pod(kube, meshed_namespace, "bad"))[names.STATUS] == names.STATUS_INITIALIZED


# -- acceptance 4 --------------------------------------------------------------------------------------


def test_a_recreated_sandbox_waits_for_its_own_mark(
    kube: Client, shared_dir: Path, node: NodeStandIn, webhook: WebhookProcess, agent: AgentProcess,
    meshed_namespace: str,
) -> None:  # fmt: skip
    create_through_webhook(kube, hello_pod(shared_dir, meshed_namespace, "phoenix", node.node_name))
    agent.start().wait_ready()
    first = node.wait_for(meshed_namespace, "phoenix", running, timeout=60)
    assert agent.stop() == 0

    second = node.recreate_sandbox(first.uid)
    assert second.netns_inode != first.netns_inode
    node.wait_for(
        meshed_namespace, "phoenix", lambda v: v.generation == 1 and v.container(W).state == "running"
    )
    time.sleep(1.5)  # the old mark is still on the pod: it must not let the new sandbox through
    view = node.wait_for(meshed_namespace, "phoenix")
    assert view.container(W).state == "running", node.logs(view.uid, W)
    assert view.container("hello").state == "waiting"
    detail = json.loads(annotations_of(api_pod(kube, meshed_namespace, "phoenix"))[names.DETAIL])
    assert detail["netnsInode"] == first.netns_inode
    assert f"for network namespace {first.netns_inode}, an earlier sandbox" in node.logs(view.uid, W)

    agent.start().wait_ready()
    view = node.wait_for(meshed_namespace, "phoenix", lambda v: v.generation == 1 and running(v), timeout=60)
    last = node.logs(view.uid, W).strip().splitlines()[-1]
    assert f"pod initialized for network namespace {second.netns_inode}" in last
    detail = json.loads(annotations_of(api_pod(kube, meshed_namespace, "phoenix"))[names.DETAIL])
    assert detail["netnsInode"] == second.netns_inode


# -- the webhook owns the waiter -----------------------------------------------------------------------


def test_a_waiter_the_pod_brings_never_lets_it_start_before_the_agent(
    kube: Client, shared_dir: Path, node: NodeStandIn, webhook: WebhookProcess, agent: AgentProcess,
    meshed_namespace: str,
) -> None:  # fmt: skip
    pod = hello_pod(shared_dir, meshed_namespace, "impostor", node.node_name)
    pod["spec"]["initContainers"].insert(0, {  # would exit 0 at once, whatever the agent did
        "name": W, "image": "registry.example/always-pass", "command": ["/bin/true"],
        "securityContext": copy.deepcopy(CONTAINER_RESTRICTED),
    })  # fmt: skip
    pod["spec"].setdefault("volumes", []).append({"name": names.PODINFO_VOLUME, "emptyDir": {}})
    created = create_through_webhook(kube, pod)
    waiter = created["spec"]["initContainers"][0]
    assert (waiter["image"], waiter["args"][0], "command" in waiter) == (WAITER_IMAGE, "init", False)
    assert [c["name"] for c in created["spec"]["initContainers"]].count(W) == 1

    # No agent: the real waiter holds the pod back.
    node.wait_for(meshed_namespace, "impostor", lambda v: v.container(W).state == "running")
    time.sleep(1.0)
    view = node.wait_for(meshed_namespace, "impostor")
    assert view.container(W).state == "running" and view.container(W).exit_codes == ()
    assert view.container("hello").state == "waiting"

    agent.start().wait_ready()
    view = node.wait_for(meshed_namespace, "impostor", running, timeout=60)
    assert view.container(W).exit_codes == (0,), node.logs(view.uid, W)
    last = node.logs(view.uid, W).strip().splitlines()[-1]
    assert last.startswith(
        f"istio-pod-network-controller init: pod initialized for network namespace {view.netns_inode}"
    )
    assert last.endswith("outbound redirect proven: 192.0.2.1:80 reached the proxy port 15001"), last
