"""istiod for a real-node cluster: Istio's charts installed as its docs say, istiod in node-1's network.

Envoy and istiod's image cannot be built here, but istiod's binary can (``scripts/build-istio``).
So the charts go in with ``helm install`` as anywhere else, the Deployment scaled to none, and
the binary runs on the host in node-1's network namespace (``nsenter --net``), as a
host-network pod there would: it reaches the API server through the node's VIP, and the API
server reaches its injector the way it reaches any webhook behind a Service -- through the
egress relay into node-1's network, to the Service's ClusterIP, which kube-proxy sends to the
address in the Service's EndpointSlice: node-1's, where istiod listens on 15017.

Injected proxies run the stub sidecar image (``global.proxy.image``): it listens where Envoy
would (``sidecar.py``), and the kubelet imports it from the harness's archives (no pulls).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..istiod import ISTIO_NAMESPACE, IstioBuild, Istiod
from .cluster import Node, RealCluster
from .config import API_VIP, token_kubeconfig

WEBHOOK_PORT = 15017
ENDPOINT_MANAGER = "ipnc-dev.istiod"


def istiod_in_node(
    cluster: RealCluster,
    build: IstioBuild,
    *,
    node: Node | None = None,
    revision: str = "",
    values: Mapping[str, str] | None = None,
) -> Istiod:
    """Install Istio's base and istiod charts into ``cluster`` and start istiod in ``node``'s
    (default: the first node's) network namespace; stop it with ``.stop()`` before the cluster
    stops (the harness would otherwise find it in the node's namespace)."""
    assert cluster.control_plane is not None and cluster.images is not None
    node = node or cluster.nodes[0]
    cp = cluster.control_plane
    settings = {
        # istiod runs as a process, not from the Deployment: no image to pull, nothing to scale.
        "autoscaleEnabled": "false",
        "replicaCount": "0",
        "global.proxy.image": cluster.images.stub,
        "global.imagePullPolicy": "Never",  # imported from the harness's archives, no registry
        **(values or {}),
    }

    def kubeconfig(account: str, path: Path) -> Path:
        assert cp.certs is not None
        token = cp.service_account_token(ISTIO_NAMESPACE, account, create=False)
        server = f"https://{API_VIP}:{cluster.api_port}"
        path.write_text(
            token_kubeconfig(server, ca_cert=cp.certs.ca_cert, token=token, tls_server_name="kubernetes")
        )
        path.chmod(0o600)
        return path

    istiod = Istiod(
        cp,
        build,
        revision=revision,
        values=settings,
        address=node.plan.ip,
        https_port=WEBHOOK_PORT,
        launcher=("nsenter", f"--net=/proc/{node.holder.pid}/ns/net", "--"),
        kubeconfig_writer=kubeconfig,
        route=lambda i: route_to(i, node),
    )
    return istiod.install().start(timeout=180)


def route_to(istiod: Istiod, node: Node) -> None:
    """The chart's Service without its selector (no pod of the Deployment will match), and an
    EndpointSlice of ours that names the node's address for each of its ports."""
    found = istiod.kubectl("-n", ISTIO_NAMESPACE, "get", "service", istiod.service, "-o", "json")
    service: dict[str, Any] = json.loads(found.stdout)
    istiod.kubectl(
        "-n", ISTIO_NAMESPACE, "patch", "service", istiod.service, "--type=merge",
        "-p", json.dumps({"spec": {"selector": None}}),
    )  # fmt: skip
    ports = [
        {"name": p.get("name", ""), "port": int(p.get("targetPort", p["port"])), "protocol": "TCP"}
        for p in service["spec"]["ports"]
    ]
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{istiod.service}-node",
            "namespace": ISTIO_NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": istiod.service,
                "endpointslice.kubernetes.io/managed-by": ENDPOINT_MANAGER,
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node.plan.ip], "conditions": {"ready": True}}],
        "ports": ports,
    }
    istiod.kubectl("apply", "-f", "-", input=json.dumps(slice_))
