"""Specs from pods: Istio's injected fixtures, precedence of sources, CNI semantics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from istio_pod_network_controller.cli import main
from istio_pod_network_controller.commands.rules import spec_for_manifest
from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import OutOfScope, parse_flags, spec_from_pod
from istio_pod_network_controller.spec.manifest import load_pod

WITH_ISTIO_INIT = [
    "hello.yaml.injected",
    "hello-tproxy.yaml.injected",
    "native-sidecar.yaml.injected",
    "traffic-annotations.yaml.injected",
    "traffic-annotations-empty-includes.yaml.injected",
    "traffic-annotations-wildcards.yaml.injected",
    "traffic-params.yaml.injected",
]
CNI_MODE = [
    "hello.yaml.cni.injected",
    "hello-openshift.yaml.injected",
    "proxy-override-runas.yaml.cni.injected",
]
BAD = [
    ("traffic-annotations-bad-excludeinboundports.yaml", "traffic.sidecar.istio.io/excludeInboundPorts"),
    ("traffic-annotations-bad-excludeipranges.yaml", "traffic.sidecar.istio.io/excludeOutboundIPRanges"),
    ("traffic-annotations-bad-excludeoutboundports.yaml", "traffic.sidecar.istio.io/excludeOutboundPorts"),
    ("traffic-annotations-bad-includeinboundports.yaml", "traffic.sidecar.istio.io/includeInboundPorts"),
    ("traffic-annotations-bad-includeipranges.yaml", "traffic.sidecar.istio.io/includeOutboundIPRanges"),
]


def istio_init_args(pod: dict[str, Any]) -> list[str]:
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    args: list[str] = init["args"]
    assert args[0] == "istio-iptables"
    return args[1:]


@pytest.mark.parametrize("name", WITH_ISTIO_INIT)
def test_injected_istio_init_args_are_the_spec(injected_dir: Path, name: str) -> None:
    pod = load_pod(str(injected_dir / name))
    assert render(spec_from_pod(pod)) == render(parse_flags(istio_init_args(pod)))


@pytest.mark.parametrize("name", CNI_MODE)
def test_cni_mode_pods_use_their_annotations_and_proxy_identity(injected_dir: Path, name: str) -> None:
    pod = load_pod(str(injected_dir / name))
    spec = spec_from_pod(pod)
    validation = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-validation")
    expected_uid = int(validation["args"][validation["args"].index("-u") + 1])
    assert spec.proxy_uids == (expected_uid,)
    assert spec.inbound_ports.wildcard and spec.outbound_cidrs.wildcard
    assert spec.inbound_ports_exclude == (15020, 15021, 15090)


@pytest.mark.parametrize(("name", "annotation"), BAD)
def test_bad_annotation_manifests_are_rejected(
    capsys: pytest.CaptureFixture[str], injected_dir: Path, name: str, annotation: str
) -> None:
    code = main(["rules", "--pod", str(injected_dir / name)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert annotation in err and err.count("\n") == 1


def test_host_network_pod_is_out_of_scope(capsys: pytest.CaptureFixture[str], injected_dir: Path) -> None:
    code = main(["rules", "--pod", str(injected_dir / "hello-host-network.yaml.injected")])
    out, err = capsys.readouterr()
    assert (code, out) == (3, "")
    assert "host network" in err and err.count("\n") == 1


def pod(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {}},
        "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
    }
    for key, value in extra.items():
        if key == "annotations":
            base["metadata"]["annotations"] = value
        else:
            base[key] = value
    return base


def test_a_manifest_without_sidecar_is_out_of_scope_for_the_commands() -> None:
    with pytest.raises(OutOfScope, match="no Istio sidecar"):
        spec_for_manifest({"kind": "Pod", "metadata": {}, "spec": {"containers": [{"name": "app"}]}}, None)


def test_ipv6_pod_address_turns_on_ip6tables() -> None:
    spec = spec_from_pod(pod(status={"podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}))
    assert spec.ipv6 and render(spec).ip6tables


def test_webhook_annotation_takes_precedence_over_annotations() -> None:
    args = json.dumps(["istio-iptables", "-p", "15001", "-u", "4242", "-b", "*", "-i", "*"])
    spec = spec_from_pod(
        pod(
            annotations={
                "pod-network-controller.istio.io/iptables-args": args,
                "traffic.sidecar.istio.io/includeInboundPorts": "80",
            }
        )
    )
    assert spec.proxy_uids == (4242,) and spec.inbound_ports.wildcard


def test_proxy_uid_zero_means_default_and_pod_level_uid_counts() -> None:
    p = pod()
    p["spec"]["containers"][1]["securityContext"] = {"runAsUser": 0}
    assert spec_from_pod(p).proxy_uids == (1337,)
    p = pod()
    p["spec"]["securityContext"] = {"runAsUser": 2000, "runAsGroup": 3000}
    spec = spec_from_pod(p)
    assert (spec.proxy_uids, spec.proxy_gids) == ((2000,), (3000,))


def test_openshift_namespace_uid_range_gives_the_proxy_uid() -> None:
    namespace = {"metadata": {"annotations": {"openshift.io/sa.scc.uid-range": "1000620000/10000"}}}
    assert spec_from_pod(pod(), namespace).proxy_uids == (1000620000,)


def test_dns_capture_env_on_istio_init_captures_all_dns() -> None:
    p = pod()
    p["spec"]["initContainers"] = [
        {
            "name": "istio-init",
            "args": ["istio-iptables", "-i", "*"],
            "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}],
        }
    ]
    spec = spec_from_pod(p)
    assert spec.dns_enabled and spec.capture_all_dns


def test_workload_kinds_and_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    template = {"metadata": {"annotations": {}}, "spec": pod()["spec"]}
    cron = {
        "kind": "CronJob",
        "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": template}}},
    }
    path = tmp_path / "cron.json"
    path.write_text(json.dumps(cron))
    assert load_pod(str(path))["spec"] == template["spec"]
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(pod())))
    assert main(["rules", "--pod", "-", "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"iptables", "ip6tables"} and doc["ip6tables"] == ""


def test_out_of_range_proxy_uid_is_rejected_not_rendered() -> None:
    from istio_pod_network_controller.spec import SpecError

    p = pod()
    p["spec"]["containers"][1]["securityContext"] = {"runAsUser": -5}
    with pytest.raises(SpecError, match="runAsUser"):
        spec_from_pod(p)
