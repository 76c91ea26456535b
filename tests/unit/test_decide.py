"""The membership decision, one rule per test."""

from __future__ import annotations

from typing import Any

from istio_pod_network_controller import names
from istio_pod_network_controller.decide import decide


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    base_spec: dict[str, Any] = {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}
    base_spec.update(spec)
    return {
        "metadata": {"name": "p", "namespace": "shop", "annotations": annotations or {}},
        "spec": base_spec,
    }


OPT_IN = {names.OPT_IN: "true"}


def ns(annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "shop", "annotations": annotations or {}, "labels": labels or {}}}


def test_opted_in_meshed_pod_is_ours() -> None:
    assert decide(pod(OPT_IN), ns()).ours


def test_namespace_annotation_or_label_opts_in() -> None:
    assert decide(pod(), ns(annotations=OPT_IN)).ours
    assert decide(pod(), ns(labels=OPT_IN)).ours


def test_not_opted_in_is_not_ours() -> None:
    assert decide(pod(), ns()).reason == "not opted in"
    assert not decide(pod({names.OPT_IN: "false"}), ns()).ours


def test_waiting_init_container_opts_in() -> None:
    assert decide(pod(initContainers=[{"name": names.WAITER_CONTAINER}]), None).ours


def test_host_network_pod_is_never_ours() -> None:
    assert not decide(pod(OPT_IN, hostNetwork=True), ns(annotations=OPT_IN)).ours


def test_openshift_deployer_and_build_pods_are_never_ours() -> None:
    for key in (names.OPENSHIFT_DEPLOYER, names.OPENSHIFT_BUILD):
        assert not decide(pod({**OPT_IN, key: "x"}), ns()).ours


def test_excluded_namespace() -> None:
    p = pod(OPT_IN)
    p["metadata"]["namespace"] = "kube-system"
    assert not decide(p, None).ours
    assert not decide(pod(OPT_IN), ns(), excluded_namespaces={"shop"}).ours


def test_pod_without_a_proxy_container_is_not_ours_even_if_istio_marked_it() -> None:
    bare = {
        "metadata": {"namespace": "shop", "annotations": OPT_IN},
        "spec": {"containers": [{"name": "app"}]},
    }
    assert not decide(bare, None).ours
    bare["metadata"]["annotations"] = {**OPT_IN, names.SIDECAR_STATUS: "{}"}
    decision = decide(bare, None)
    assert not decision.ours and "no Istio sidecar" in decision.reason


def test_a_gateway_is_not_ours() -> None:
    """Istio's gateway injection (`inject.istio.io/templates: gateway`) runs `proxy router`: sidecar
    capture would send the gateway's inbound traffic to 15006, where nothing listens."""
    args = ["proxy", "router", "--domain", "$(POD_NAMESPACE).svc.cluster.local"]
    gateway = pod(OPT_IN, containers=[{"name": "istio-proxy", "image": "auto", "args": args}])
    decision = decide(gateway, ns())
    assert not decision.ours and "'router'" in decision.reason and "gateway" in decision.reason


def test_a_sidecar_proxy_type_or_none_is_ours() -> None:
    for args in (["proxy", "sidecar", "--domain", "x"], [], ["--concurrency", "2"]):
        assert decide(pod(OPT_IN, containers=[{"name": "istio-proxy", "args": args}]), ns()).ours, args


def test_disable_envoy_is_not_ours() -> None:
    env = [{"name": "DISABLE_ENVOY", "value": "true"}]
    proxy: dict[str, Any] = {"name": "istio-proxy", "args": ["proxy", "sidecar"], "env": env}
    decision = decide(pod(OPT_IN, containers=[{"name": "app"}, proxy]), ns())
    assert not decision.ours and "DISABLE_ENVOY" in decision.reason
    proxy["env"] = [{"name": "DISABLE_ENVOY", "value": "false"}]
    assert decide(pod(OPT_IN, containers=[{"name": "app"}, proxy]), ns()).ours


def test_native_sidecar_counts() -> None:
    p = pod(
        OPT_IN,
        containers=[{"name": "app"}],
        initContainers=[{"name": "istio-proxy", "restartPolicy": "Always"}],
    )
    assert decide(p, None).ours


def test_pod_label_opts_in_as_the_webhook_object_selector_matches_it() -> None:
    p = pod()
    p["metadata"]["labels"] = OPT_IN
    assert decide(p, ns()).ours
