"""The one membership decision: is this pod ours to program? Shared by the agent and the webhook.

Pure: a pod, its namespace (or None when unknown) and the excluded namespaces in, a Decision
out, with the reason in words so that logs and `rules` can say why a pod was left alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from . import names
from .spec.pod import PROXY_CONTAINER, annotations_of, envoy_disabled, proxy_container, proxy_type

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


def scope_problem(pod: Mapping[str, Any]) -> str | None:
    """Why a pod can never be programmed, whatever its opt-in (None when it can): the pods that
    Istio's CNI plugin also leaves alone, and OpenShift's deployer and build pods."""
    spec = pod.get("spec")
    if isinstance(spec, Mapping) and spec.get("hostNetwork") is True:
        return "pod uses the host network: it has no network namespace of its own to program"
    annotations = annotations_of(pod)
    if names.OPENSHIFT_DEPLOYER in annotations or names.OPENSHIFT_BUILD in annotations:
        return "OpenShift deployer or build pod"
    proxy = proxy_container(pod)
    if proxy is None:
        return f"pod has no Istio sidecar (no '{PROXY_CONTAINER}' container or native sidecar)"
    kind = proxy_type(proxy)
    if kind not in ("", "sidecar"):
        # Gateways run `proxy router`: they listen where sidecar capture would redirect to.
        return f"its proxy is of type {kind[:40]!r}, not a sidecar (a gateway): capture would break it"
    if envoy_disabled(proxy):
        return "its proxy runs without Envoy (DISABLE_ENVOY): nothing would receive captured traffic"
    return None


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
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    ns_name = metadata.get("namespace") or _name_of(namespace)
    if ns_name in excluded_namespaces:
        return Decision(False, f"namespace {ns_name} is excluded")
    problem = scope_problem(pod)
    if problem is not None:
        return Decision(False, problem)
    how = opted_in(pod, namespace)
    if how is None:
        return Decision(False, "not opted in")
    return Decision(True, f"meshed, opted in by {how}")


def _name_of(obj: Mapping[str, Any] | None) -> str | None:
    metadata = (obj or {}).get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return name if isinstance(name, str) else None
