"""The demo's pure parts: its prerequisites fail with one line naming the setup command, and its
sample pods are shaped as istiod injects them (compared with Istio's own injected fixture), so
that what the demo shows is what happens to a real meshed pod."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipnc_dev.demo import orchestration, realnode, scenario, summary
from ipnc_dev.demo.display import Display
from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import spec_from_pod

NAMESPACE = {"metadata": {"name": "mesh-demo", "labels": {"istio-pod-network-controller/initialize": "true"}}}


def _istio_hello(injected_dir: Path) -> dict[str, Any]:
    doc = next(d for d in yaml.safe_load_all((injected_dir / "hello.yaml.injected").read_text()) if d)
    template = doc["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod["spec"]["initContainers"] if c["name"] == name)
    return found


def test_not_root_fails_with_one_line_naming_the_setup_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert orchestration.run(orchestration.Options()) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs root" in err and "./scripts/setup" in err, err


def test_a_missing_test_binary_names_the_setup_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(orchestration, "SYSTEM_TOOLS", ("ls",))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.delenv("IPNC_TESTBIN_DIR", raising=False)
    monkeypatch.setenv("IPNC_TESTBIN_CACHE", str(tmp_path))
    assert orchestration.run(orchestration.Options()) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'etcd'" in err and "./scripts/setup" in err, err


def test_a_missing_system_tool_names_it_and_the_setup_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(orchestration, "SYSTEM_TOOLS", ("ls", "ipnc-no-such-tool"))
    expected = r"missing system tools: ipnc-no-such-tool\. Run \./scripts/setup"
    with pytest.raises(orchestration.DemoError, match=expected):
        orchestration.check_prerequisites()


def test_the_sample_pod_is_shaped_as_istiod_injects_it(injected_dir: Path) -> None:
    istio = _istio_hello(injected_dir)
    ours = scenario.sample_pod("frontend", "mesh-demo", "node-1")
    assert [c["name"] for c in ours["spec"]["initContainers"]] == ["istio-init", "istio-proxy"]
    for name in ("istio-init", "istio-proxy"):
        mine, theirs = _container(ours, name), _container(istio, name)
        assert mine["args"] == theirs["args"], name
        assert mine["securityContext"] == theirs["securityContext"], name
        assert mine.get("restartPolicy") == theirs.get("restartPolicy"), name
        assert {m["mountPath"]: m["name"] for m in mine.get("volumeMounts", [])} == {
            m["mountPath"]: m["name"] for m in theirs.get("volumeMounts", [])
        }, name
    assert {v["name"] for v in ours["spec"]["volumes"]} == {v["name"] for v in istio["spec"]["volumes"]}
    assert set(istio["metadata"]["annotations"]) <= set(ours["metadata"]["annotations"])
    assert set(istio["metadata"]["labels"]) - {"tier", "track"} <= set(ours["metadata"]["labels"])
    # The agent builds the same redirect spec, so the same rules, from either pod.
    assert render(spec_from_pod(ours, NAMESPACE)).sha256() == render(spec_from_pod(istio, NAMESPACE)).sha256()


def test_only_istio_init_adds_capabilities() -> None:
    pod = scenario.sample_pod("backend", "mesh-demo", "node-2")
    assert sorted(scenario.added_capabilities(pod)) == ["NET_ADMIN", "NET_RAW"]
    pod["spec"]["initContainers"] = [c for c in pod["spec"]["initContainers"] if c["name"] != "istio-init"]
    assert scenario.added_capabilities(pod) == []
    assert pod["spec"]["nodeName"] == "node-2" and pod["spec"]["serviceAccountName"] == "backend"


def test_the_pod_for_istiods_injector_is_the_sample_pod_without_istios_parts() -> None:
    """With istiod built, the demo creates this and istiod's injector adds istio-init, the
    sidecar, their volumes, labels and annotations; it passes restricted as it is."""
    plain = scenario.application_pod("frontend", "mesh-demo", "node-1", name="frontend-x")
    injected = scenario.sample_pod("frontend", "mesh-demo", "node-1", name="frontend-x")
    assert "initContainers" not in plain["spec"] and "volumes" not in plain["spec"]
    assert scenario.added_capabilities(plain) == []
    assert "annotations" not in plain["metadata"]
    istio_labels = set(injected["metadata"]["labels"]) - set(plain["metadata"]["labels"])
    assert istio_labels == {
        "security.istio.io/tlsMode",
        "service.istio.io/canonical-name",
        "service.istio.io/canonical-revision",
    }
    stripped = {**injected["spec"]}
    del stripped["initContainers"], stripped["volumes"]
    assert stripped == plain["spec"]
    assert {k: injected["metadata"][k] for k in ("name", "namespace")} == {
        "name": "frontend-x",
        "namespace": "mesh-demo",
    }


def test_istiod_publishes_its_own_ca_so_the_namespace_then_brings_none() -> None:
    def config_maps(docs: list[dict[str, Any]]) -> list[str]:
        return [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]

    assert config_maps(scenario.namespace_objects("PEM")) == ["istio-ca-root-cert"]
    assert config_maps(scenario.namespace_objects(None)) == []
    namespace = scenario.namespace_objects(None)[0]
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"


def test_the_webhook_probe_for_istiods_injector_has_no_sidecar_of_its_own() -> None:
    with_sidecar = scenario.webhook_probe_pod(1)
    bare = scenario.webhook_probe_pod(2, sidecar=False)
    assert [c["name"] for c in with_sidecar["spec"]["containers"]] == ["app", "istio-proxy"]
    assert [c["name"] for c in bare["spec"]["containers"]] == ["app"]
    # Istio's injector adds a projected token volume, which the API server refuses without one.
    assert bare["spec"]["serviceAccountName"] in scenario.SERVICES


@pytest.mark.parametrize(
    ("injection", "said"),
    [
        ("saved", "pods injected by Istio's saved injection output (istiod is not built)"),
        ("istiod v1.2.3", "pods injected by istiod v1.2.3's injector, with Istio's charts, then our webhook"),
        ("", None),
    ],
)
def test_the_summary_says_which_injection_made_the_pods(
    injection: str, said: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    summary.print_summary(Display(live=False), summary.Summary(ok=True, injection=injection))
    out = capsys.readouterr().out
    assert "OK: 0/0 pods" in out
    if said is None:
        assert "pods injected by" not in out
    else:
        assert said in out


# -- demo --real-node ------------------------------------------------------------------------------------


def test_real_node_without_its_binaries_fails_with_one_line_naming_the_setup_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("IPNC_REALNODE_CACHE", str(tmp_path))
    assert orchestration.run(orchestration.Options(real_node=True)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--real-node needs the real-node binaries and images" in err and "./scripts/setup" in err, err
    assert "kubelet" in err, err


def test_real_node_pods_change_only_the_sidecar_image_and_the_application() -> None:
    ours = realnode.real_pod("frontend", stub="stub:1", busybox="busybox:1", target="10.0.0.9", requests=2)
    istio = scenario.sample_pod("frontend", "mesh-demo", "node-1", name=ours["metadata"]["name"])
    assert ours["metadata"] == istio["metadata"]
    assert _container(ours, "istio-init") == _container(istio, "istio-init")
    proxy, theirs = _container(ours, "istio-proxy"), _container(istio, "istio-proxy")
    assert (proxy.pop("image"), proxy.pop("imagePullPolicy")) == ("stub:1", "Never")
    assert proxy == {k: v for k, v in theirs.items() if k != "image"}
    (app,) = ours["spec"]["containers"]
    assert app["image"] == "busybox:1" and app["securityContext"]["runAsUser"] == realnode.APP_UID
    assert {"name": "TARGET", "value": "10.0.0.9"} in app["env"]
    assert {"name": "REQUESTS", "value": "2"} in app["env"]
    last = realnode.real_pod("database", stub="s", busybox="b", target=None, requests=2)
    assert "nc " not in last["spec"]["containers"][0]["command"][-1]


def test_real_node_replies_and_sidecar_records_are_read_from_logs() -> None:
    app_log = 'client: {"server": "istio-proxy", "token": "req:1:a"}\nnoise\nclient: not json\n'
    assert realnode.client_replies(app_log) == [{"server": "istio-proxy", "token": "req:1:a"}, {}]
    sidecar_log = '{"token": "req:1:a"}\n{"token": 5}\n[1]\nhealth ok\n{"token": "req:2:a"}\n'
    assert realnode.sidecar_tokens(sidecar_log) == {"req:1:a", "req:2:a"}
