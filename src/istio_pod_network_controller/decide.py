"""The one membership decision: is this pod ours to program? Shared by the agent and the webhook.

Pure: a pod, its namespace (or None when unknown) and the excluded namespaces in, a Decision
out, with the reason in words so that logs and `rules` can say why a pod was left alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from . import names
from .spec.pod import annotations_of, proxy_container

DEFAULT_EXCLUDED_NAMESPACES = ("kube-system",)


@dataclass(frozen=True, slots=True)
class Decision:
    ours: bool
    reason: str


def _labels_of(obj: Mapping[str, Any] | None) -> dict[str, str]:
    metadata = (obj or {}).get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def has_waiter(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec")
    inits = spec.get("initContainers") if isinstance(spec, Mapping) else None
    if not isinstance(inits, list):
        return False
    return any(isinstance(c, Mapping) and c.get("name") == names.WAITER_CONTAINER for c in inits)


def has_mesh_sidecar(pod: Mapping[str, Any]) -> bool:
    return proxy_container(pod) is not None or names.SIDECAR_STATUS in annotations_of(pod)


def opted_in(pod: Mapping[str, Any], namespace: Mapping[str, Any] | None) -> str | None:
    """How the pod is opted in, or None."""
    if annotations_of(pod).get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "pod annotation"
    if _labels_of(pod).get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "pod label"  # a label, unlike an annotation, is what a webhook objectSelector matches
    if annotations_of(namespace).get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "namespace annotation"
    if _labels_of(namespace).get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "namespace label"
    if has_waiter(pod):
        return "waiting init container"
    return None


def decide(
    pod: Mapping[str, Any],
    namespace: Mapping[str, Any] | None,
    *,
    excluded_namespaces: Collection[str] = DEFAULT_EXCLUDED_NAMESPACES,
) -> Decision:
    spec = pod.get("spec") if isinstance(pod.get("spec"), Mapping) else {}
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    assert isinstance(spec, Mapping) and isinstance(metadata, Mapping)
    if spec.get("hostNetwork") is True:
        return Decision(False, "host network pod")
    annotations = annotations_of(pod)
    if names.OPENSHIFT_DEPLOYER in annotations or names.OPENSHIFT_BUILD in annotations:
        return Decision(False, "OpenShift deployer or build pod")
    ns_name = metadata.get("namespace") or _name_of(namespace)
    if ns_name in excluded_namespaces:
        return Decision(False, f"namespace {ns_name} is excluded")
    if not has_mesh_sidecar(pod):
        return Decision(False, "no mesh sidecar")
    how = opted_in(pod, namespace)
    if how is None:
        return Decision(False, "not opted in")
    return Decision(True, f"meshed, opted in by {how}")


def _name_of(obj: Mapping[str, Any] | None) -> str | None:
    metadata = (obj or {}).get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return name if isinstance(name, str) else None
