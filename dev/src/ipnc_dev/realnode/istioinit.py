"""Istio's own privileged path on a real node, beside ours: the same injected pod, with istiod's
istio-init kept (its real ``istio-iptables``, from ``scripts/build-images``' istio-init image)
instead of our waiter, in a namespace that allows it.

The benchmark compares the two paths on one cluster in one run, so both pods must be the same
but for what each path puts before the sidecar: ours goes into a ``restricted`` namespace opted
in to the controller (the webhook swaps istio-init for the waiter), Istio's into a
``privileged`` namespace that is not opted in (the webhook leaves it alone; istio-init keeps its
NET_ADMIN and NET_RAW, runs as root and writes the rules itself, exactly as injected).

Pure: builds objects; ``bench/realnode.py`` applies them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from istio_pod_network_controller import names

from . import workload

NAMESPACE = "istio-privileged"
PRIVILEGED = {f"pod-security.kubernetes.io/{mode}": "privileged" for mode in ("enforce", "audit", "warn")}


def namespace_objects(ca_pem: str, *, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """``workload``'s namespace objects (namespace, CA ConfigMap, Service) for Istio's path: the
    namespace at Pod Security ``privileged`` and without the controller's opt-in label."""
    objects = workload.namespace_objects(ca_pem, namespace=namespace)
    for obj in objects:
        if obj["kind"] == "Namespace":
            labels = {
                k: v
                for k, v in obj["metadata"]["labels"].items()
                if k != names.OPT_IN and not k.startswith("pod-security.kubernetes.io/")
            }
            obj["metadata"]["labels"] = {**labels, **PRIVILEGED}
    return objects


def pod_of(deployment: Mapping[str, Any], *, namespace: str, generate_name: str) -> dict[str, Any]:
    """One bare pod of ``deployment``'s template (its labels, annotations and spec), so that a
    benchmark creates and times each pod itself (no ReplicaSet in between)."""
    template = copy.deepcopy(dict(deployment["spec"]["template"]))
    metadata = dict(template.get("metadata") or {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": generate_name,
            "namespace": namespace,
            "labels": dict(metadata.get("labels") or {}),
            "annotations": dict(metadata.get("annotations") or {}),
        },
        "spec": template["spec"],
    }


def without_resources(pod: Mapping[str, Any]) -> dict[str, Any]:
    """``pod`` with no container requesting or limiting resources: Istio's injected requests
    (100m CPU for each of istio-init and istio-proxy) would keep a burst of 20 from fitting on a
    two-core node. Both paths' pods get the same change."""
    out = copy.deepcopy(dict(pod))
    for key in ("initContainers", "containers"):
        for container in out["spec"].get(key) or []:
            container.pop("resources", None)
    return out


def with_istio_init(pod: Mapping[str, Any], *, image: str) -> dict[str, Any]:
    """``pod`` with its istio-init run from ``image`` (never pulled), everything else as injected:
    the same arguments and the same securityContext (NET_ADMIN, NET_RAW, UID 0)."""
    out = copy.deepcopy(dict(pod))
    inits = [c for c in out["spec"].get("initContainers") or [] if c.get("name") == workload.ISTIO_INIT]
    if len(inits) != 1:
        raise ValueError(f"expected one {workload.ISTIO_INIT} init container, found {len(inits)}")
    inits[0]["image"] = image
    inits[0]["imagePullPolicy"] = "Never"
    return out


def istio_init_args(pod: Mapping[str, Any]) -> Sequence[str]:
    """istio-init's arguments (istiod's ``istio-iptables -p 15001 ...``)."""
    for container in (pod.get("spec") or {}).get("initContainers") or []:
        if container.get("name") == workload.ISTIO_INIT:
            return [str(a) for a in container.get("args") or []]
    raise ValueError(f"no {workload.ISTIO_INIT} init container")
