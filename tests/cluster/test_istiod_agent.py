"""The agent programs what istiod injected, and the kernel ends up with Istio's own rules.

The pods of ``test_istiod_injection`` (istiod built from the pinned module, Istio's charts, our
webhook after Istio's injector), bound to a stand-in node whose sandboxes are real network
namespaces, with the real agent (``run``) under the chart's RBAC. For each sidecar the ruleset the
agent leaves in the pod's namespace must be the one Istio's own text leaves in a fresh namespace
(the conformance vectors' kernel verdict: same rules, same order, in every chain; our tag comments
aside): Istio's CNI plugin's for CNI-mode injection, istio-init's (through Istio's istio-iptables)
otherwise. Gateways, ``inject: "false"`` and ``DISABLE_ENVOY`` pods get no rules and no mark.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev import chart
from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.cgroups import KubeletCgroups
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.istiod import (
    IstioBuild,
    Istiod,
    chart_webhook_configuration,
    cni_plugin_rules,
    find_build,
    gateway_pod,
    istio_init_rules,
    mesh_namespace,
    start_istiod,
    without_dns_servers,
    workload_pod,
)
from ipnc_dev.netlab import Netlab
from ipnc_dev.sandbox import Sandboxes
from ipnc_dev.webhookproc import WebhookProcess, webhook_kubeconfig
from istio_pod_network_controller import names
from istio_pod_network_controller.node.backend import Family, detect
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.node.tables import parse_save

pytestmark = pytest.mark.cluster

WAITER_IMAGE = "registry.example/istio-pod-network-controller:test"
DISABLE_ENVOY = {"proxy.istio.io/config": json.dumps({"proxyMetadata": {"DISABLE_ENVOY": "true"}})}
DNS_AND_PORTS = {
    "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32",
    "proxy.istio.io/config": json.dumps({"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}),
}
CLASSIC = {"sidecar.istio.io/nativeSidecar": "false"}


@dataclass(frozen=True)
class Workload:
    name: str
    istiod: str  # "default" or "cni"
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


SIDECARS = [
    Workload("default-sidecar", "default"),
    Workload("classic-sidecar", "default", CLASSIC),
    Workload("default-annotated", "default", DNS_AND_PORTS),
    Workload("cni-sidecar", "cni"),
    Workload("cni-annotated", "cni", DNS_AND_PORTS),
]
LEFT_ALONE = [
    Workload("inject-false", "default", labels={"sidecar.istio.io/inject": "false"}),
    Workload("cni-disable-envoy", "cni", DISABLE_ENVOY),
]
COMMENT = re.compile(r'(?:^| )-m comment --comment (?:"[^"]*"|\S+)')


@dataclass
class Mesh:
    control_plane: ControlPlane
    build: IstioBuild


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    build = find_build()
    if build is None:
        pytest.fail("istiod is not built for the pinned Istio version: run scripts/build-istio")
    with ControlPlane.start() as cp:
        folder = Path(tempfile.mkdtemp(prefix="ipnc-istiod-agent-"))
        kubeconfig = webhook_kubeconfig(cp, "ipnc-system", folder / "webhook-kubeconfig")
        webhook = WebhookProcess(kubeconfig, extra=[f"--waiter-image={WAITER_IMAGE}"], folder=folder)
        istiods: list[Istiod] = []
        try:
            istiods.append(start_istiod(cp, build=build))
            istiods.append(
                start_istiod(cp, build=build, revision="cni", values={"pilot.cni.enabled": "true"})
            )
            webhook.start()
            # Ours called after Istio's injector (both orders: test_istiod_injection).
            config = chart_webhook_configuration(webhook, "zzz-istio-pod-network-controller")
            cp.kubectl("apply", "-f", "-", input=json.dumps(config))
            yield Mesh(cp, build)
        finally:
            webhook.stop()
            shutil.rmtree(folder, ignore_errors=True)
            for istiod in istiods:
                istiod.stop()


def create(cp: ControlPlane, pod: dict[str, Any], ns: str, node: str) -> dict[str, Any]:
    body = {
        **pod,
        "metadata": {**pod["metadata"], "namespace": ns},
        "spec": {**pod["spec"], "nodeName": node},
    }
    run = cp.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(body))
    created: dict[str, Any] = json.loads(run.stdout)
    return created


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def kernel_rules(save_output: str) -> dict[tuple[str, str], list[str]]:
    """Every non-empty chain of a saved ruleset, its rules in order, tag comments dropped."""
    state = parse_save(save_output)
    out: dict[tuple[str, str], list[str]] = {}
    for table, chains in state.tables.items():
        for chain in chains:
            if chain.rules:
                out[(table, chain.name)] = [COMMENT.sub("", rule).strip() for rule in chain.rules]
    return out


def loaded(lab: Netlab, text: str) -> dict[tuple[str, str], list[str]]:
    """``text`` (iptables-restore input) as the kernel holds it, loaded into a fresh namespace."""
    tools = detect()
    with Netns(lab.add_netns(f"want{uuid.uuid4().hex[:4]}")) as ns:
        done = ns.run(tools.restore_argv(Family.IPV4), stdin=text)
        assert done.ok, done.reason()
        return kernel_rules(ns.run(tools.save_argv(Family.IPV4)).stdout)


def istios_text(mesh: Mesh, pod: dict[str, Any]) -> str:
    """What Istio applies to this pod: its CNI plugin's rules, or, where Istio injected
    istio-init, that istio-init's (its arguments are the ones our webhook kept)."""
    kept = pod["metadata"]["annotations"].get(names.IPTABLES_ARGS)
    if kept is None:
        return cni_plugin_rules(mesh.build, pod, mesh.control_plane.kubeconfig_path)["iptables"]
    init = {"name": "istio-init", "args": json.loads(kept)}
    return without_dns_servers(istio_init_rules(mesh.build, {"spec": {"initContainers": [init]}})["iptables"])


def test_the_agent_programs_istiods_sidecars_with_istios_own_rules(mesh: Mesh) -> None:
    cp = mesh.control_plane
    cp.kubectl("create", "namespace", "istio-pod-network-controller", check=False)
    kubeconfig: Path = chart.agent_kubeconfig(cp, "istio-pod-network-controller")
    node = f"node-{uuid.uuid4().hex[:6]}"
    with Netlab() as lab, KubeletCgroups() as cgroups:
        boxes = Sandboxes(lab, cgroups, cp.kubectl)
        agent = AgentProcess(kubeconfig, node)
        try:
            agent.start().wait_ready()
            pods: dict[str, dict[str, Any]] = {}
            for case in [*SIDECARS, *LEFT_ALONE]:
                body = workload_pod(case.name, annotations=case.annotations, labels=case.labels)
                pods[case.name] = create(cp, body, mesh_namespace(cp, case.istiod, opted_in=True), node)
            gateway_ns = mesh_namespace(cp, "default", opted_in=True)
            pods["gateway"] = create(cp, gateway_pod(cp, mesh.build, gateway_ns), gateway_ns, node)
            for pod in pods.values():
                boxes.create(pod)

            def current(name: str) -> dict[str, Any]:
                meta = pods[name]["metadata"]
                found: dict[str, Any] = json.loads(
                    cp.kubectl("get", "pod", meta["name"], "-n", meta["namespace"], "-o", "json").stdout
                )
                return found

            def marked(name: str) -> bool:
                return current(name)["metadata"].get("annotations", {}).get(names.STATUS) is not None

            wait_for("every sidecar marked", lambda: all(marked(c.name) for c in SIDECARS))
            for case in SIDECARS:
                pod = current(case.name)
                assert pod["metadata"]["annotations"][names.STATUS] == names.STATUS_INITIALIZED, case.name
                applied = kernel_rules(boxes.iptables_save(pod["metadata"]["uid"]))
                assert applied == loaded(lab, istios_text(mesh, pod)), case.name
            # The agent has handled every pod it was sent by now (it watched them all from the
            # start); the others got nothing.
            assert agent.metric("ipnc_pods_watched") == len(pods)
            for name in [*(c.name for c in LEFT_ALONE), "gateway"]:
                pod = current(name)
                assert names.STATUS not in pod["metadata"].get("annotations", {}), name
                assert "ISTIO" not in boxes.iptables_save(pod["metadata"]["uid"]), name
        finally:
            agent.stop()
            agent.close()
