"""Pods that Istio's CNI plugin leaves alone are left alone here too, through the real webhook
and agent: a gateway (Istio's gateway injection runs `proxy router`; sidecar capture would send its
inbound traffic to 15006, where no listener is) and a proxyless pod (`DISABLE_ENVOY`). Both live in
an opted-in namespace beside a normal meshed pod, which shows the agent was at work meanwhile.
"""

# ruff: noqa: F811 -- pytest fixtures imported from test_waiter_e2e are parameters here
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod
from test_waiter_e2e import (  # noqa: F401 -- fixtures shared with the waiter's end-to-end tests
    CONTAINER_RESTRICTED,
    W,
    agent,
    agent_kubeconfig,
    annotations_of,
    api_pod,
    create_through_webhook,
    hello_pod,
    meshed_namespace,
    node,
    running,
    webhook,
)

from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.standin import NodeStandIn
from ipnc_dev.webhookproc import WebhookProcess
from istio_pod_network_controller import names
from istio_pod_network_controller.node.backend import Family, detect
from istio_pod_network_controller.node.netns import Netns

pytestmark = pytest.mark.cluster


def gateway_pod(namespace: str, node: str) -> dict[str, Any]:
    """As Istio's `gateway` injection template leaves a gateway Deployment's pod: the proxy runs
    `proxy router`, there is no istio-init, and the injector's status annotation is there."""
    proxy = {
        "name": "istio-proxy",
        "image": "registry.example/proxyv2:test",
        "args": ["proxy", "router", "--domain", "$(POD_NAMESPACE).svc.cluster.local",
                 "--proxyLogLevel=warning", "--log_output_level=default:info"],
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        "securityContext": copy.deepcopy(CONTAINER_RESTRICTED),
    }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "ingress",
            "namespace": namespace,
            "labels": {"istio": "ingressgateway", "sidecar.istio.io/inject": "true"},
            "annotations": {
                "inject.istio.io/templates": "gateway",
                names.SIDECAR_STATUS: '{"initContainers":null,"containers":["istio-proxy"],"volumes":[]}',
            },
        },
        "spec": {
            "nodeName": node,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [proxy],
        },
    }


def proxyless_pod(shared_dir: Path, namespace: str, node: str) -> dict[str, Any]:
    pod = hello_pod(shared_dir, namespace, "proxyless", node, istio_init=False)
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    proxy = next(c for c in containers if c["name"] == "istio-proxy")
    proxy["env"] = [*proxy.get("env", []), {"name": "DISABLE_ENVOY", "value": "true"}]
    return pod


def own_rules(view_netns: str) -> str:
    tools = detect()
    with Netns(view_netns) as ns:
        done = ns.run(tools.save_argv(Family.IPV4))
        assert done.ok, done.reason()
        return done.stdout


def test_a_gateway_and_a_proxyless_pod_get_no_waiter_and_no_rules(
    kube: Client, shared_dir: Path, node: NodeStandIn, webhook: WebhookProcess, agent: AgentProcess,
    meshed_namespace: str,
) -> None:  # fmt: skip
    agent.start().wait_ready()
    create_through_webhook(kube, hello_pod(shared_dir, meshed_namespace, "hello", node.node_name))
    left_alone = [gateway_pod(meshed_namespace, node.node_name),
                  proxyless_pod(shared_dir, meshed_namespace, node.node_name)]  # fmt: skip
    for pod in left_alone:
        created: dict[str, Any] = kube.create(Pod.from_dict(copy.deepcopy(pod))).to_dict()  # type: ignore[arg-type]
        names_ = [c["name"] for c in created["spec"].get("initContainers") or []]
        assert W not in names_, f"{pod['metadata']['name']} was given a waiter"

    node.wait_for(meshed_namespace, "hello", running, timeout=60)  # the agent was at work
    for pod in left_alone:
        view = node.wait_for(meshed_namespace, pod["metadata"]["name"], running, timeout=60)
        time.sleep(0.5)  # any late reconcile of this pod would have happened by now
        assert names.STATUS not in annotations_of(api_pod(kube, meshed_namespace, view.name))
        assert "ISTIO" not in own_rules(view.netns), view.name
    assert "pod initialized" in agent.logs() and "ingress" not in agent.logs()
