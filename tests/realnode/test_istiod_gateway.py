"""istiod (built from the pinned module, installed with Istio's charts) on a real node, with our chart.

One node; our chart from our image; istiod in the node's network (``ipnc_dev.realnode.istiod``),
its injected proxies the stub sidecar. In a namespace labelled for Istio and opted in to us:

* a gateway installed with Istio's own ``gateway`` chart runs and serves traffic with no waiter
  and no rules from us (our chart's webhook configuration comes after Istio's injector; the other
  order, where our webhook first takes the gateway's placeholder proxy for a sidecar's, is
  ``tests/cluster/test_istiod_injection.py``'s);
* an application pod that Istio injects gets our waiter, the agent's rules and mark, and its
  connection to the gateway's Service is redirected to its own sidecar.

A client outside the mesh reaches the gateway through its Service (the proxy's status port,
what a load balancer's health check asks), and the gateway's port 80 is not redirected to the
inbound capture port (it would be, with sidecar rules: the stub answers there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ipnc_dev import chart
from ipnc_dev.istiod import OPT_IN_LABEL, Istiod, find_build
from ipnc_dev.realnode import RealCluster, artifacts, install, mesh
from ipnc_dev.realnode.istiod import istiod_in_node
from istio_pod_network_controller import names

from .conftest import needs_root, timings

pytestmark = pytest.mark.realnode

NAMESPACE = "gateway-mesh"
OUTSIDE = "outside"
GATEWAY = "gateway"
APP = "app"
TIMEOUT = 240.0
CLIENT_SCRIPT = """trap 'exit 0' TERM
timeout 10 wget -q -O /dev/null "http://$GATEWAY_SERVICE_HOST:15021/healthz/ready"; echo "health=$?"
nc -w 3 "$GATEWAY_POD" 80 </dev/null >/dev/null 2>&1; echo "port80=$?"
sleep 2147483647 &
wait
"""
APP_SCRIPT = """trap 'exit 0' TERM
echo "reply=$(printf 'app:token\\n' | nc -w 3 "$GATEWAY_SERVICE_HOST" 80 2>&1)"
sleep 2147483647 &
wait
"""


@dataclass
class Run:
    cluster: RealCluster
    gateway: mesh.PodView
    gateway_spec: dict[str, Any]
    gateway_rules: str
    gateway_ip: str
    app: mesh.PodView
    client: mesh.PodView
    istiod: Istiod


def busybox_pod(name: str, namespace: str, image: str, script: str, env: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": name,
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", script],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                    "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
                }
            ],
        },
    }


def wait(what: str, check: Callable[[], bool], cluster: RealCluster, namespace: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {TIMEOUT:g} s:\n{install.describe(cluster, namespace)}")
        time.sleep(1.0)


def view(cluster: RealCluster, namespace: str, prefix: str) -> mesh.PodView | None:
    found = [p for p in mesh.pods(cluster, namespace) if p.name.startswith(prefix)]
    return found[0] if len(found) == 1 else None


def running(cluster: RealCluster, namespace: str, prefix: str) -> bool:
    pod = view(cluster, namespace, prefix)
    return pod is not None and pod.phase == "Running" and pod.ready


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    needs_root()
    build = find_build()
    if build is None:
        pytest.fail("istiod is not built for the pinned Istio version: run scripts/build-istio")
    t0 = time.monotonic()
    archives = (artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE, artifacts.STUB_ARCHIVE)
    with RealCluster(nodes=1, image_archives=archives) as cluster:
        assert cluster.images is not None
        install.install(cluster)
        istiod = istiod_in_node(cluster, build)
        try:
            t_istiod = time.monotonic()
            for ns, labels in (
                (NAMESPACE, {"istio-injection": "enabled", OPT_IN_LABEL: "true"}),
                (OUTSIDE, {}),
            ):
                cluster.kubectl("create", "namespace", ns)
                if labels:
                    cluster.kubectl("label", "namespace", ns, *[f"{k}={v}" for k, v in labels.items()])
            chart.helm(
                "install", GATEWAY, str(build.charts / "gateway"), "-n", NAMESPACE,
                # No registry on the node: the injected stub image is imported. (The chart's pod
                # asks for image "auto", untagged, so the API server defaults it to Always.)
                "--set", "service.type=ClusterIP", "--set", "imagePullPolicy=Never",
                "--set", "autoscaling.enabled=false",
                kubeconfig=cluster.kubeconfig_path, env=cluster.helm_env(), timeout=120,
            )  # fmt: skip
            wait(
                "the gateway Running and Ready",
                lambda: running(cluster, NAMESPACE, GATEWAY),
                cluster,
                NAMESPACE,
            )
            gateway = view(cluster, NAMESPACE, GATEWAY)
            assert gateway is not None
            spec = json.loads(
                cluster.kubectl("-n", NAMESPACE, "get", "pod", gateway.name, "-o", "json").stdout
            )["spec"]
            sandbox = cluster.sandbox(cluster.nodes[0], gateway.uid)
            rules = "".join(
                cluster.in_netns(sandbox.pid, tool) for tool in ("iptables-legacy-save", "iptables-nft-save")
            )
            svc = json.loads(cluster.kubectl("-n", NAMESPACE, "get", "service", GATEWAY, "-o", "json").stdout)
            gateway_ip = svc["spec"]["clusterIP"]
            env = {"GATEWAY_SERVICE_HOST": gateway_ip, "GATEWAY_POD": gateway.ip}
            images = cluster.images
            for body in (
                busybox_pod(APP, NAMESPACE, images.busybox, APP_SCRIPT, env),
                busybox_pod("client", OUTSIDE, images.busybox, CLIENT_SCRIPT, env),
            ):
                cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
            wait("the app Running and Ready", lambda: running(cluster, NAMESPACE, APP), cluster, NAMESPACE)
            wait("the client Running", lambda: running(cluster, OUTSIDE, "client"), cluster, OUTSIDE)
            time.sleep(5)  # the client's two checks take at most 13 s, the app's one 3 s

            def logs(ns: str, name: str, container: str) -> mesh.PodView:
                pod = view(cluster, ns, name)
                assert pod is not None
                return mesh.read_logs(cluster, ns, pod, [container])

            app = logs(NAMESPACE, APP, APP)
            client = logs(OUTSIDE, "client", "client")
            deadline = time.monotonic() + 20
            while "port80=" not in client.logs["client"] and time.monotonic() < deadline:
                time.sleep(1)
                client = logs(OUTSIDE, "client", "client")
            yield Run(cluster, gateway, spec, rules, gateway_ip, app, client, istiod)
        finally:
            istiod.stop()
        timings.append(
            f"real-node istiod: istiod ready {t_istiod - t0:.1f} s after the start, "
            f"{time.monotonic() - t0:.1f} s in all"
        )


def test_the_gateway_runs_and_serves_with_no_waiter_and_no_rules(run: Run) -> None:
    proxy = next(c for c in run.gateway_spec["containers"] if c["name"] == "istio-proxy")
    assert proxy["args"][:2] == ["proxy", "router"] and proxy["image"] != "auto"
    inits = [c["name"] for c in run.gateway_spec.get("initContainers") or []]
    assert names.WAITER_CONTAINER not in inits, inits
    assert names.STATUS not in run.gateway.annotations
    assert "ISTIO" not in run.gateway_rules, run.gateway_rules
    log = run.client.logs["client"]
    assert "health=0" in log, log  # through the Service, to the gateway's proxy
    assert "port80=0" not in log, log  # not redirected to the inbound capture port


def test_an_app_that_istiod_injected_is_programmed_and_captured(run: Run) -> None:
    assert run.app.annotations.get(names.STATUS) == names.STATUS_INITIALIZED
    assert run.app.container(names.WAITER_CONTAINER).exit_code == 0
    line = run.app.logs[APP]
    assert '"server": "istio-proxy"' in line and f'"orig": ["{run.gateway_ip}", 80]' in line, line
