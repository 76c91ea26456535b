"""The one membership decision: is this pod ours to program? Shared by the agent and the webhook.

Pure: a pod, its namespace (or None when unknown) and the excluded namespaces in, a Decision
out, with the reason in words so that logs and `rules` can say why a pod was left alone.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from . import names
from .podfacts import (
    PROXY_CONTAINER,
    AnyNamespace,
    AnyPod,
    NamespaceFacts,
    PodFacts,
    namespace_facts,
    pod_facts,
)
from .spec.pod import envoy_disabled

DEFAULT_EXCLUDED_NAMESPACES = ("kube-system",)


@dataclass(frozen=True, slots=True)
class Decision:
    ours: bool
    reason: str


def scope_problem(pod: AnyPod) -> str | None:
    """Why a pod can never be programmed, whatever its opt-in (None when it can): the pods that
    Istio's CNI plugin also leaves alone, and OpenShift's deployer and build pods."""
    pod = pod_facts(pod)
    if pod.host_network:
        return "pod uses the host network: it has no network namespace of its own to program"
    if names.OPENSHIFT_DEPLOYER in pod.annotations or names.OPENSHIFT_BUILD in pod.annotations:
        return "OpenShift deployer or build pod"
    if pod.proxy is None:
        return f"pod has no Istio sidecar (no '{PROXY_CONTAINER}' container or native sidecar)"
    kind = pod.proxy.proxy_type
    if kind not in ("", "sidecar"):
        # Gateways run `proxy router`: they listen where sidecar capture would redirect to.
        return f"its proxy is of type {kind[:40]!r}, not a sidecar (a gateway): capture would break it"
    if envoy_disabled(pod.proxy):
        return "its proxy runs without Envoy (DISABLE_ENVOY): nothing would receive captured traffic"
    return None


def opted_in(pod: PodFacts, namespace: NamespaceFacts | None) -> str | None:
    """How the pod is opted in, or None."""
    if pod.annotations.get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "pod annotation"
    if pod.labels.get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "pod label"  # a label, unlike an annotation, is what a webhook objectSelector matches
    if namespace is not None and namespace.annotations.get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "namespace annotation"
    if namespace is not None and namespace.labels.get(names.OPT_IN) == names.OPT_IN_VALUE:
        return "namespace label"
    if pod.waiter is not None:
        return "waiting init container"
    return None


def decide(
    pod: AnyPod,
    namespace: AnyNamespace,
    *,
    excluded_namespaces: Collection[str] = DEFAULT_EXCLUDED_NAMESPACES,
) -> Decision:
    pod = pod_facts(pod)
    ns = namespace_facts(namespace)
    ns_name = pod.namespace or (ns.name if ns is not None else "")
    if ns_name in excluded_namespaces:
        return Decision(False, f"namespace {ns_name} is excluded")
    problem = scope_problem(pod)
    if problem is not None:
        return Decision(False, problem)
    how = opted_in(pod, ns)
    if how is None:
        return Decision(False, "not opted in")
    return Decision(True, f"meshed, opted in by {how}")
