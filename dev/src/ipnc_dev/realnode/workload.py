"""Istio's own injected workloads, made runnable on a real node that has no registry and no Envoy.

The Deployments are istiod's injection output (``../shared/istio/injected``: istio-init with
NET_ADMIN, istio-proxy as a native sidecar, Istio's volumes and annotations). Four things change,
and nothing else: the proxy's image becomes the stub sidecar (``sidecar.py``: it listens where
Envoy would and logs what reached it), the application becomes busybox running a small client
(one connection to the ``hello`` Service, carrying a token that names the pod), the application
container and the pod get the security settings Pod Security ``restricted`` demands of any
application (Istio's own containers already meet it, but for istio-init, which our webhook
removes), and the replica count. The namespace enforces ``restricted`` and opts in to the
controller, so a pod starts only if the webhook turned istio-init into our waiter.

Pure but for ``load``: the test applies these and reads back what happened.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from istio_pod_network_controller import names

NAMESPACE = "restricted-mesh"
SERVICE = "hello"
SERVICE_PORT = 80
APP_UID = 1000
ISTIO_INIT = "istio-init"
ISTIO_PROXY = "istio-proxy"
OUTBOUND_PORT = 15001
TOKEN_PREFIX = "app:"
CLIENT_LINE = "client: "
# Which injected manifests, and how many pods of each: one with Istio's defaults, one whose
# annotations exclude outbound ranges and inbound ports (its rules differ, the Service is still
# captured).
SOURCES: tuple[tuple[str, int], ...] = (
    ("hello.yaml.injected", 10),
    ("traffic-annotations-wildcards.yaml.injected", 10),
)
# The application: one connection to the Service, retried while the sidecar is not up yet (it
# is, as a native sidecar with a startup probe: the retry is for a slow first answer), its reply
# logged as one line; then it idles until SIGTERM (a container's PID 1 must trap it itself).
CLIENT_SCRIPT = f"""trap 'exit 0' TERM
reply=""
i=0
while [ $i -lt 20 ]; do
  reply=$(printf '{TOKEN_PREFIX}%s\\n' "$POD_NAME" | nc -w 3 "$HELLO_SERVICE_HOST" {SERVICE_PORT} 2>&1)
  case "$reply" in *'"server"'*) break ;; esac
  i=$((i + 1))
  sleep 1
done
echo "{CLIENT_LINE}$reply"
sleep 2147483647 &
wait
"""
RESTRICTED_CONTAINER: Mapping[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": APP_UID,
    "runAsGroup": APP_UID,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}


@dataclass(frozen=True)
class Images:
    """The images the workload runs from (names as imported into the nodes)."""

    app: str
    proxy: str


def load(path: Path) -> dict[str, Any]:
    """The one Deployment of an injected manifest file."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise ValueError(f"{path}: expected one Deployment, found {len(deployments)}")
    return deployments[0]


def runnable(
    deployment: Mapping[str, Any], *, images: Images, replicas: int, namespace: str = NAMESPACE
) -> dict[str, Any]:
    """``deployment`` (istiod's output) with the four changes of the module's docstring."""
    out = copy.deepcopy(dict(deployment))
    out["metadata"] = {**out.get("metadata", {}), "namespace": namespace}
    spec = out["spec"]
    spec["replicas"] = replicas
    pod = spec["template"]["spec"]
    pod["securityContext"] = {
        **(pod.get("securityContext") or {}),
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    proxies = [
        c for c in pod.get("initContainers", []) + pod.get("containers", []) if c.get("name") == ISTIO_PROXY
    ]
    if len(proxies) != 1:
        raise ValueError(f"{out['metadata'].get('name')}: expected one {ISTIO_PROXY} container")
    proxies[0]["image"] = images.proxy
    proxies[0]["imagePullPolicy"] = "Never"
    app = pod["containers"][0]
    app.update(
        image=images.app,
        imagePullPolicy="Never",
        command=["sh", "-c", CLIENT_SCRIPT],
        env=[{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        securityContext=copy.deepcopy(dict(RESTRICTED_CONTAINER)),
    )
    app.pop("args", None)
    return out


def namespace_objects(ca_pem: str, *, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The namespace (``restricted`` enforced, opted in to the controller), the CA ConfigMap
    istiod publishes in every namespace (the sidecar mounts it), and the Service the
    applications call."""
    labels = {**POD_SECURITY, names.OPT_IN: names.OPT_IN_VALUE, "istio-injection": "enabled"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": namespace},
            "data": {"root-cert.pem": ca_pem},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": namespace},
            "spec": {
                "selector": {"app": SERVICE},
                "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
            },
        },
    ]


def webhook_probe(namespace: str = NAMESPACE) -> dict[str, Any]:
    """A pod with an istio-proxy that passes ``restricted``: created, it comes back with the
    waiter once the API server calls the webhook. Its scheduling gate keeps it off every node
    until it is deleted again. (A server-side dry run would not do: the webhook leaves dry runs
    unchanged.)"""
    container = {
        "image": "example.invalid/probe:1",
        "securityContext": copy.deepcopy(dict(RESTRICTED_CONTAINER)),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "webhook-probe-", "namespace": namespace},
        "spec": {
            "schedulingGates": [{"name": "istio-pod-network-controller.io/webhook-probe"}],
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": n, **copy.deepcopy(container)} for n in ("app", ISTIO_PROXY)],
        },
    }


def client_reply(log: str) -> dict[str, Any] | None:
    """The sidecar's answer the application logged, or None."""
    for line in log.splitlines():
        if line.startswith(CLIENT_LINE):
            try:
                reply = json.loads(line[len(CLIENT_LINE) :])
            except ValueError:
                return None
            return reply if isinstance(reply, dict) else None
    return None


def sidecar_records(log: str) -> list[dict[str, Any]]:
    """The connections the stub sidecar logged (one JSON object per line)."""
    out: list[dict[str, Any]] = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "token" in record:
            out.append(record)
    return out


def intercepted(reply: Mapping[str, Any], *, pod: str, service_ip: str) -> bool:
    """The application's connection to the Service reached its own sidecar's outbound port,
    with the Service as the original destination and the pod's own token."""
    return (
        reply.get("server") == ISTIO_PROXY
        and reply.get("port") == OUTBOUND_PORT
        and reply.get("orig") == [service_ip, SERVICE_PORT]
        and reply.get("token") == f"{TOKEN_PREFIX}{pod}"
        and reply.get("pod") == pod
    )


PLAIN_NAMESPACE = "plain"


def plain_objects(
    image: str, *, namespace: str = PLAIN_NAMESPACE, name: str = "plain"
) -> list[dict[str, Any]]:
    """A namespace that did not opt in and a DaemonSet in it whose pods only sleep (one on every
    node, and a drain leaves them be): the agent must never write a rule into their network
    namespaces, and nothing of ours may be found there."""
    labels = {"app": name}
    container = {
        "name": "sleep",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"],
        "securityContext": copy.deepcopy(dict(RESTRICTED_CONTAINER)),
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [container],
                    },
                },
            },
        },
    ]
