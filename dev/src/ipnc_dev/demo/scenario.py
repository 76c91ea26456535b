"""The demo's story as data: the sample application (frontend -> backend -> database) and its pods,
before injection (for istiod's own injector, when it is built) and exactly as istiod's sidecar
injector returns them (Istio's saved injection output, otherwise), the namespace that enforces ``restricted``,
and what counts as a mutated pod and an intercepted request.

Pure: no process, no API call. The orchestration creates these objects; ``tests/unit/test_demo.py``
compares the pods with Istio's own injected fixture, so what the demo shows is what happens to a
real meshed pod.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Mapping
from typing import Any

from istio_pod_network_controller import names

DEMO_NAMESPACE = "mesh-demo"
NODES = ("node-1", "node-2")
# Each service calls the next; placed so that both hops cross from one node to the other.
SERVICES = ("frontend", "backend", "database")
PLACEMENT = {"frontend": "node-1", "backend": "node-2", "database": "node-1"}
SERVICE_PORT = 80
APP_PORT = 8080
PROXY_IMAGE = "docker.io/istio/proxyv2:1.26.2"
APP_IMAGE = "registry.example/mesh-demo/{service}:1.0"
PROXY_UID = 1337
OUTBOUND_PORT = 15001
ISTIO_INIT = "istio-init"
ISTIO_PROXY = "istio-proxy"
W = names.WAITER_CONTAINER

# What istiod's injection template writes for istio-init (REDIRECT mode, Istio's default ports)
# and for the sidecar.
ISTIO_INIT_ARGS = (
    "istio-iptables", "-p", str(OUTBOUND_PORT), "-z", "15006", "-u", str(PROXY_UID), "-m", "REDIRECT",
    "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info",
)  # fmt: skip
PROXY_ARGS = (
    "proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning",
    "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
)  # fmt: skip
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


# -- the sample application, as istiod injects it --------------------------------------------------


def _istio_init() -> dict[str, Any]:
    """istio-init as istiod's sidecar template writes it (REDIRECT mode, default ports)."""
    return {
        "name": ISTIO_INIT,
        "image": PROXY_IMAGE,
        "args": list(ISTIO_INIT_ARGS),
        "resources": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "10m", "memory": "40Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": False,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "runAsUser": 0,
        },
    }


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _istio_proxy(service: str, namespace: str) -> dict[str, Any]:
    """istio-proxy as a native sidecar (an init container with restartPolicy Always)."""
    env: list[dict[str, Any]] = [
        {"name": "PILOT_CERT_PROVIDER", "value": "istiod"},
        {"name": "CA_ADDR", "value": "istiod.istio-system.svc:15012"},
        {"name": "POD_NAME", **_field("metadata.name")},
        {"name": "POD_NAMESPACE", **_field("metadata.namespace")},
        {"name": "INSTANCE_IP", **_field("status.podIP")},
        {"name": "SERVICE_ACCOUNT", **_field("spec.serviceAccountName")},
        {"name": "HOST_IP", **_field("status.hostIP")},
        {"name": "PROXY_CONFIG", "value": "{}\n"},
        {"name": "ISTIO_META_POD_PORTS", "value": json.dumps([{"name": "http", "containerPort": APP_PORT}])},
        {"name": "ISTIO_META_APP_CONTAINERS", "value": service},
        {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
        {"name": "ISTIO_META_NODE_NAME", **_field("spec.nodeName")},
        {"name": "ISTIO_META_INTERCEPTION_MODE", "value": "REDIRECT"},
        {"name": "ISTIO_META_WORKLOAD_NAME", "value": service},
        {"name": "ISTIO_META_OWNER", "value": f"kubernetes://apis/v1/namespaces/{namespace}/pods/{service}"},
        {"name": "ISTIO_META_MESH_ID", "value": "cluster.local"},
        {"name": "TRUST_DOMAIN", "value": "cluster.local"},
    ]
    mounts = [
        ("/var/run/secrets/workload-spiffe-uds", "workload-socket"),
        ("/var/run/secrets/credential-uds", "credential-socket"),
        ("/var/run/secrets/workload-spiffe-credentials", "workload-certs"),
        ("/var/run/secrets/istio", "istiod-ca-cert"),
        ("/var/run/secrets/istio/crl", "istio-ca-crl"),
        ("/var/lib/istio/data", "istio-data"),
        ("/etc/istio/proxy", "istio-envoy"),
        ("/var/run/secrets/tokens", "istio-token"),
        ("/etc/istio/pod", "istio-podinfo"),
    ]
    return {
        "name": ISTIO_PROXY,
        "image": PROXY_IMAGE,
        "args": list(PROXY_ARGS),
        "env": env,
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        "readinessProbe": {
            "failureThreshold": 4,
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 15,
            "timeoutSeconds": 3,
        },
        "startupProbe": {
            "failureThreshold": 600,
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 1,
            "timeoutSeconds": 3,
        },
        "resources": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "10m", "memory": "40Mi"}},
        "restartPolicy": "Always",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "runAsUser": PROXY_UID,
        },
        "volumeMounts": [{"mountPath": path, "name": name} for path, name in mounts],
    }


def _istio_volumes() -> list[dict[str, Any]]:
    return [
        {"name": "workload-socket", "emptyDir": {}},
        {"name": "credential-socket", "emptyDir": {}},
        {"name": "workload-certs", "emptyDir": {}},
        {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
        {"name": "istio-data", "emptyDir": {}},
        {
            "name": "istio-podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                ]
            },
        },
        {
            "name": "istio-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": "istio-ca",
                            "expirationSeconds": 43200,
                            "path": "istio-token",
                        }
                    }
                ]
            },
        },
        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
        {"name": "istio-ca-crl", "configMap": {"name": "istio-ca-crl", "optional": True}},
    ]


def pod_suffix() -> str:
    """Five characters, as a ReplicaSet's pods get."""
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(secrets.choice(alphabet) for _ in range(5))


def application_pod(service: str, namespace: str, node: str, name: str | None = None) -> dict[str, Any]:
    """The sample application's pod for ``service`` as its Deployment would create it, before
    any injection, bound to ``node``: written for ``restricted``, as an application in such a
    namespace must be. With istiod running, its injector adds Istio's parts to this."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name or f"{service}-{pod_suffix()}",
            "namespace": namespace,
            "labels": {"app": service, "version": "v1"},
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": service,
                    "image": APP_IMAGE.format(service=service),
                    "ports": [{"containerPort": APP_PORT, "name": "http", "protocol": "TCP"}],
                    "securityContext": copy.deepcopy(RESTRICTED_CONTAINER),
                }
            ],
        },
    }


def sample_pod(service: str, namespace: str, node: str, name: str | None = None) -> dict[str, Any]:
    """The sample application's pod for ``service`` as istiod's sidecar injector returns it
    (istio-init with NET_ADMIN, istio-proxy as a native sidecar, Istio's volumes and
    annotations): ``application_pod`` with Istio's parts, as Istio's saved injection output has
    them. Only Istio's istio-init is not written for ``restricted``."""
    status = {
        "initContainers": [ISTIO_INIT, ISTIO_PROXY],
        "containers": None,
        "volumes": [v["name"] for v in _istio_volumes()],
        "imagePullSecrets": None,
        "revision": "default",
    }
    pod = application_pod(service, namespace, node, name)
    pod["metadata"]["labels"] |= {
        "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": service,
        "service.istio.io/canonical-revision": "v1",
    }
    pod["metadata"]["annotations"] = {
        "istio.io/rev": "default",
        "kubectl.kubernetes.io/default-container": service,
        "kubectl.kubernetes.io/default-logs-container": service,
        "prometheus.io/path": "/stats/prometheus",
        "prometheus.io/port": "15020",
        "prometheus.io/scrape": "true",
        names.SIDECAR_STATUS: json.dumps(status, separators=(",", ":")),
    }
    pod["spec"]["initContainers"] = [_istio_init(), _istio_proxy(service, namespace)]
    pod["spec"]["volumes"] = _istio_volumes()
    return pod


def added_capabilities(pod: Mapping[str, Any]) -> list[str]:
    """Every capability any container of the pod adds."""
    found: list[str] = []
    spec = pod.get("spec") or {}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            found += ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
    return found


def init_names(pod: Mapping[str, Any]) -> list[str]:
    return [str(c.get("name")) for c in (pod.get("spec") or {}).get("initContainers") or []]


def is_mutated(created: Mapping[str, Any]) -> bool:
    """The webhook did its part: the waiter first, no istio-init, no capability added, and
    istio-init's arguments kept as the annotation the agent reads."""
    inits = init_names(created)
    annotations = (created.get("metadata") or {}).get("annotations") or {}
    return (
        inits[:1] == [W]
        and ISTIO_INIT not in inits
        and not added_capabilities(created)
        and names.IPTABLES_ARGS in annotations
    )


def namespace_objects(ca_pem: str | None) -> list[dict[str, Any]]:
    """The demo's namespace (``restricted`` enforced, opted in to the controller and to Istio's
    injection), the CA ConfigMap istiod publishes in every namespace (the sidecar mounts it; with
    ``ca_pem`` None, a running istiod publishes its own), and one ServiceAccount and Service per
    service."""
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
        "pod-security.kubernetes.io/audit": "restricted",
        names.OPT_IN: names.OPT_IN_VALUE,
        "istio-injection": "enabled",
    }
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE, "labels": labels}}
    ]
    if ca_pem is not None:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "istio-ca-root-cert", "namespace": DEMO_NAMESPACE},
                "data": {"root-cert.pem": ca_pem},
            }
        )
    for service in SERVICES:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": service, "namespace": DEMO_NAMESPACE},
            }
        )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": service, "namespace": DEMO_NAMESPACE, "labels": {"app": service}},
                "spec": {
                    "selector": {"app": service},
                    "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
                },
            }
        )
    return docs


def webhook_probe_pod(attempt: int, *, sidecar: bool = True) -> dict[str, Any]:
    """An unscheduled pod that passes ``restricted``: created to see whether the API server calls
    the webhook yet (no stand-in runs a pod without a node). With ``sidecar`` it carries an
    istio-proxy of its own (no injector runs); without, istiod's injector adds Istio's parts, and
    PodSecurity refuses it until our webhook is called too."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"webhook-probe-{attempt}", "namespace": DEMO_NAMESPACE},
        "spec": {
            # What the ServiceAccount admission plugin would set (it is off in the control plane);
            # the token volume istiod's injector adds needs it.
            "serviceAccountName": SERVICES[0],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": n,
                    "image": "registry.example/probe",
                    "securityContext": copy.deepcopy(RESTRICTED_CONTAINER),
                }
                for n in ("app", ISTIO_PROXY)[: 2 if sidecar else 1]
            ],
        },
    }


def intercepted(reply: Mapping[str, Any], address: str, *, recorded_by_sidecar: bool) -> bool:
    """A request to ``address``:SERVICE_PORT was captured: the sender's own sidecar answered on
    its outbound port with that original destination, and logged this very connection."""
    return (
        reply.get("server") == ISTIO_PROXY
        and reply.get("port") == OUTBOUND_PORT
        and reply.get("orig") == [address, SERVICE_PORT]
        and recorded_by_sidecar
    )
