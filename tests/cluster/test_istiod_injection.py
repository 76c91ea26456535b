"""Istio's own injector and ours on the same pods, through a real API server, in both orders.

istiod is built from the pinned Istio module and installed with Istio's own charts
(``ipnc_dev.istiod``): a default istiod whose sidecars get istio-init, a ``canary`` revision, and a
``cni`` revision installed with ``pilot.cni.enabled=true`` (``istio_cni.enabled`` in older
charts): CNI-mode injection, no istio-init, ``traffic.sidecar.istio.io/*`` annotations for Istio's
CNI plugin, which is not installed (our agent does its job). Our webhook runs as its own
process, registered with the chart's own webhook entries (selectors, ``reinvocationPolicy``),
pointed at it by URL. The API server calls the configurations in the order of their names, so
ours is registered once as ``aaa-...`` (called before Istio's ``istio-sidecar-injector``) and once
as ``zzz-...`` (after it).

For every template, the pod is created twice: in a namespace opted in to us, and in a twin
namespace labelled for Istio alone. The first shows what both webhooks make of it; the second is
the pod exactly as Istio would run it, from which Istio itself computes the rules: through
istio-init's own arguments and environment (Istio's istio-iptables, dry run) when it has one,
through Istio's CNI plugin (its ADD, dry run, reading the pod from the API server) when it does
not. Sidecars must get from us rules text-identical to Istio's (the conformance vectors'
comparison); gateways, ``sidecar.istio.io/inject: "false"`` and ``DISABLE_ENVOY`` pods must be left
exactly as Istio alone leaves them, with no waiter, and Istio's CNI plugin programs nothing there
either.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.istiod import (
    IstioBuild,
    Istiod,
    chart_webhook_configuration,
    cni_plugin_rules,
    find_build,
    gateway_pod,
    istio_init_rules,
    mesh_namespace,
    normalized,
    our_rules,
    split_families,
    start_istiod,
    without_dns_servers,
    workload_pod,
)
from ipnc_dev.webhookproc import WebhookProcess, webhook_kubeconfig
from istio_pod_network_controller import names
from istio_pod_network_controller.decide import decide

pytestmark = pytest.mark.cluster

WAITER_IMAGE = "registry.example/istio-pod-network-controller:test"
# The names the API server orders mutating webhook configurations by: Istio's is
# istio-sidecar-injector[-REV].
ORDERS = {"ours-first": "aaa-istio-pod-network-controller", "ours-last": "zzz-istio-pod-network-controller"}
MESH_CONFIG = json.dumps({"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}})
ANNOTATED = {
    "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
    "traffic.sidecar.istio.io/includeInboundPorts": "8080,9090",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32",
    "traffic.sidecar.istio.io/excludeInboundPorts": "9091",
    "proxy.istio.io/config": MESH_CONFIG,
}


@dataclass(frozen=True)
class Case:
    """One template: which istiod injects it, what the pod asks for, and whether it is a sidecar
    we must program."""

    name: str
    istiod: str  # "default", "canary" or "cni"
    sidecar: bool
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


CASES = [
    # This Istio injects istio-proxy as a native sidecar by default; the annotation picks either.
    Case("default-sidecar", "default", True),
    Case("classic-sidecar", "default", True, annotations={"sidecar.istio.io/nativeSidecar": "false"}),
    Case("default-annotated", "default", True, annotations=ANNOTATED),
    Case("native-sidecar", "default", True, annotations={"sidecar.istio.io/nativeSidecar": "true"}),
    Case("revision", "canary", True),
    Case("cni-sidecar", "cni", True),
    Case("cni-classic-sidecar", "cni", True, annotations={"sidecar.istio.io/nativeSidecar": "false"}),
    Case("cni-annotated", "cni", True, annotations=ANNOTATED),
    Case("cni-native-sidecar", "cni", True, annotations={"sidecar.istio.io/nativeSidecar": "true"}),
    Case("inject-false", "default", False, labels={"sidecar.istio.io/inject": "false"}),
    Case("cni-inject-false", "cni", False, labels={"sidecar.istio.io/inject": "false"}),
    Case(
        "disable-envoy",
        "default",
        False,
        annotations={"proxy.istio.io/config": json.dumps({"proxyMetadata": {"DISABLE_ENVOY": "true"}})},
    ),
    Case(
        "cni-disable-envoy",
        "cni",
        False,
        annotations={"proxy.istio.io/config": json.dumps({"proxyMetadata": {"DISABLE_ENVOY": "true"}})},
    ),
]


@dataclass
class Mesh:
    control_plane: ControlPlane
    build: IstioBuild
    istiods: dict[str, Istiod]
    webhook: WebhookProcess


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """A control plane of its own (Istio's webhooks would otherwise see every other test's pods),
    three istiods and our webhook."""
    build = find_build()
    if build is None:
        pytest.fail("istiod is not built for the pinned Istio version: run scripts/build-istio")
    with ControlPlane.start() as cp:
        istiods: dict[str, Istiod] = {}
        folder = Path(tempfile.mkdtemp(prefix="ipnc-istiod-test-"))
        kubeconfig = webhook_kubeconfig(cp, "ipnc-system", folder / "webhook-kubeconfig")
        webhook = WebhookProcess(kubeconfig, extra=[f"--waiter-image={WAITER_IMAGE}"], folder=folder)
        try:
            istiods["default"] = start_istiod(cp, build=build)
            istiods["canary"] = start_istiod(cp, build=build, revision="canary")
            istiods["cni"] = start_istiod(
                cp, build=build, revision="cni", values={"pilot.cni.enabled": "true"}
            )
            # Istio's injector called again after ours: not Istio's default, a user's choice.
            istiods["reinvoked"] = start_istiod(
                cp,
                build=build,
                revision="reinvoked",
                values={"sidecarInjectorWebhook.reinvocationPolicy": "IfNeeded"},
            )
            webhook.start()
            yield Mesh(cp, build, istiods, webhook)
        finally:
            webhook.stop()
            shutil.rmtree(folder, ignore_errors=True)
            for istiod in istiods.values():
                istiod.stop()


@pytest.fixture(params=sorted(ORDERS))
def order(request: pytest.FixtureRequest, mesh: Mesh) -> Iterator[str]:
    """Our configuration, registered under a name that sorts before or after Istio's."""
    name = ORDERS[request.param]
    mesh.control_plane.kubectl(
        "apply", "-f", "-", input=json.dumps(chart_webhook_configuration(mesh.webhook, name))
    )
    yield request.param
    mesh.control_plane.kubectl("delete", "mutatingwebhookconfiguration", name)


def namespace(cp: ControlPlane, istiod: str, *, opted_in: bool) -> str:
    return mesh_namespace(cp, istiod, opted_in=opted_in)


def create(cp: ControlPlane, pod: dict[str, Any], ns: str) -> dict[str, Any]:
    body = {**pod, "metadata": {**pod["metadata"], "namespace": ns}}
    created: dict[str, Any] = json.loads(
        cp.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(body)).stdout
    )
    return created


def workload(case: Case) -> dict[str, Any]:
    return workload_pod(case.name, annotations=case.annotations, labels=case.labels)


def init_names(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod["spec"].get("initContainers", [])]


def comparable(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod's spec and the annotations Istio wrote, without what differs between two creations."""
    spec = copy.deepcopy(pod["spec"])
    annotations = dict(pod["metadata"].get("annotations", {}))
    return {
        "spec": json.loads(json.dumps(spec).replace(pod["metadata"]["namespace"], "NS")),
        "annotations": annotations,
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_template_gets_what_istio_would_give_it(mesh: Mesh, order: str, case: Case) -> None:
    cp = mesh.control_plane
    ours = create(cp, workload(case), namespace(cp, case.istiod, opted_in=True))
    alone = create(cp, workload(case), namespace(cp, case.istiod, opted_in=False))
    everything = [*ours["spec"]["containers"], *ours["spec"].get("initContainers", [])]
    injected = "istio-proxy" in {c["name"] for c in everything}
    assert injected == (case.labels.get("sidecar.istio.io/inject") != "false"), case.name
    # Istio's CNI plugin, reading the pod as the API server stored it after both webhooks.
    plugin = cni_plugin_rules(mesh.build, ours, cp.kubeconfig_path)

    if not case.sidecar:
        if "DISABLE_ENVOY" in case.annotations.get("proxy.istio.io/config", ""):
            # Istio's istio-init injection still gives it istio-init (NET_ADMIN and all).
            assert ("istio-init" in init_names(ours)) == (case.istiod != "cni"), init_names(ours)
        assert names.WAITER_CONTAINER not in init_names(ours)
        assert comparable(ours) == comparable(alone), f"{case.name} ({order}) was changed by us"
        assert not decide(ours, None).ours
        assert normalized(plugin["iptables"]) == [] and normalized(plugin["ip6tables"]) == []
        return

    assert init_names(ours)[0] == names.WAITER_CONTAINER, f"{case.name} ({order}): {init_names(ours)}"
    assert "istio-init" not in init_names(ours)
    # Istio's own containers are exactly what Istio alone injects.
    assert comparable(ours)["spec"]["containers"] == comparable(alone)["spec"]["containers"]
    produced = {k: normalized(v) for k, v in our_rules(ours).items()}

    if "istio-init" in init_names(alone):
        # Istio's CNI plugin leaves a pod with istio-init alone: its istio-init is what Istio
        # applies, through Istio's istio-iptables, and exactly what we must apply.
        init = next(c for c in alone["spec"]["initContainers"] if c["name"] == "istio-init")
        kept = json.loads(ours["metadata"]["annotations"][names.IPTABLES_ARGS])
        assert kept[: len(init["args"])] == init["args"]
        by_init = istio_init_rules(mesh.build, alone)
        expected = {k: normalized(without_dns_servers(v)) for k, v in by_init.items()}
    else:
        assert names.IPTABLES_ARGS not in ours["metadata"].get("annotations", {})
        expected = {k: normalized(v) for k, v in plugin.items()}
    assert expected["iptables"], f"Istio programs nothing for {case.name}?"
    assert produced == expected, case.name


def test_injection_time_annotations_reach_the_rules(mesh: Mesh) -> None:
    """The DNS capture asked for in proxy.istio.io/config and the excluded ports reach our rules,
    in both injection modes (a comparison with Istio alone would pass if neither had them)."""
    cp = mesh.control_plane
    name = ORDERS["ours-last"]
    cp.kubectl("apply", "-f", "-", input=json.dumps(chart_webhook_configuration(mesh.webhook, name)))
    try:
        for istiod in ("default", "cni"):
            case = Case(f"{istiod}-dns", istiod, True, annotations=ANNOTATED)
            text = "\n".join(
                normalized(
                    our_rules(create(cp, workload(case), namespace(cp, istiod, opted_in=True)))["iptables"]
                )
            )
            wanted_all = ("--dport 53 ", "--dport 5432", "--dport 6379", "169.254.169.254/32", "--dport 9090")
            for wanted in wanted_all:
                assert wanted in text, f"{istiod}: {wanted!r} not in\n{text}"
    finally:
        cp.kubectl("delete", "mutatingwebhookconfiguration", name)


def test_a_gateway_from_istios_gateway_chart_is_left_alone(mesh: Mesh, order: str) -> None:
    cp = mesh.control_plane
    ours_ns, alone_ns = namespace(cp, "default", opted_in=True), namespace(cp, "default", opted_in=False)
    ours = create(cp, gateway_pod(cp, mesh.build, ours_ns), ours_ns)
    alone = create(cp, gateway_pod(cp, mesh.build, alone_ns), alone_ns)
    proxy = next(c for c in ours["spec"]["containers"] if c["name"] == "istio-proxy")
    assert proxy["image"] != "auto" and proxy["args"][:2] == ["proxy", "router"], f"not injected ({order})"
    assert init_names(ours) == [] and init_names(alone) == []
    assert decide(ours, None).reason.startswith("its proxy is of type 'router'")
    assert comparable(ours)["spec"]["containers"] == comparable(alone)["spec"]["containers"]
    expected = cni_plugin_rules(mesh.build, ours, cp.kubeconfig_path)
    assert normalized(expected["iptables"]) == [] and normalized(expected["ip6tables"]) == []


def test_a_server_side_dry_run_shows_the_pod_as_both_injectors_make_it(mesh: Mesh, order: str) -> None:
    cp = mesh.control_plane
    case = Case("dry-run", "default", True, annotations={"sidecar.istio.io/nativeSidecar": "false"})
    ns = namespace(cp, "default", opted_in=True)
    body = {**workload(case), "metadata": {**workload(case)["metadata"], "namespace": ns}}
    run = cp.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(body))
    dry = json.loads(run.stdout)
    assert init_names(dry)[0] == names.WAITER_CONTAINER and "istio-init" not in init_names(dry)
    assert names.IPTABLES_ARGS in dry["metadata"]["annotations"]
    real = create(cp, workload(case), ns)
    assert init_names(dry) == init_names(real)
    assert cp.kubectl("-n", ns, "get", "pods", "-o", "name").stdout.split() == [f"pod/{case.name}"]


def test_a_dry_run_record_splits_into_families_by_table_order() -> None:
    record = "\n".join(
        [
            "iptables-save",
            "ip6tables-save",
            "* nat",
            "-A OUTPUT -j X",
            "COMMIT",
            "* nat",
            "-A OUTPUT -j Y",
            "COMMIT",
        ]
    )
    texts = split_families(record)
    assert texts["iptables"] == "* nat\n-A OUTPUT -j X\nCOMMIT\n"
    assert texts["ip6tables"] == "* nat\n-A OUTPUT -j Y\nCOMMIT\n"
    assert split_families("iptables-save\n") == {"iptables": "", "ip6tables": ""}


def test_when_istio_is_reinvoked_too_the_charts_name_gives_us_the_last_word(mesh: Mesh) -> None:
    """With Istio's reinvocationPolicy IfNeeded, Istio's injector is called again after our change
    and puts istio-init back; the API server reinvokes each webhook once at most, so only the
    configuration called later has the last word. The chart's name sorts after Istio's."""
    cp = mesh.control_plane
    ours = chart_webhook_configuration(mesh.webhook)
    istios = cp.kubectl("get", "mutatingwebhookconfigurations", "-o", "name").stdout.split()
    istios = [n.rpartition("/")[2] for n in istios if "istio-" in n.rpartition("/")[2]]
    assert istios and all(ours["metadata"]["name"] > name for name in istios), (
        ours["metadata"]["name"],
        istios,
    )
    classic = {"sidecar.istio.io/nativeSidecar": "false"}
    for name, wanted_last in ((ours["metadata"]["name"], True), (ORDERS["ours-first"], False)):
        config = chart_webhook_configuration(mesh.webhook, name)
        cp.kubectl("apply", "-f", "-", input=json.dumps(config))
        try:
            for annotations in ({}, classic):
                case = Case("reinvoked", "reinvoked", True, annotations=annotations)
                pod = create(cp, workload(case), namespace(cp, "reinvoked", opted_in=True))
                good = init_names(pod)[0] == names.WAITER_CONTAINER and "istio-init" not in init_names(pod)
                assert good == wanted_last, (name, annotations, init_names(pod))
        finally:
            cp.kubectl("delete", "mutatingwebhookconfiguration", name)
