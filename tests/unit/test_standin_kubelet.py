"""The node stand-in's kubelet rules, without processes or a cluster: which program runs for which
container and as whom, how container paths map to the pod's folders, the downward API files and
the atomic writer's layout, the status and phase the kubelet would report, crash-loop back-off."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev.standin import kubelet
from ipnc_dev.standin.kubelet import ContainerStatus, Kind
from istio_pod_network_controller import names
from istio_pod_network_controller.podinfo import parse_annotations

POD: dict[str, Any] = {
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "uid": "1234-abcd",
        "labels": {"app": "web"},
        "annotations": {"b": 'say "hi"\n', "a": "1"},
    },
    "spec": {"nodeName": "node-1", "serviceAccountName": "web"},
    "status": {"podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}], "hostIP": "10.0.0.1"},
}
MOUNTS = [("/etc/podinfo", "/v/podinfo"), ("/work", "/v/work")]


def _plan(container: dict[str, Any], pod: dict[str, Any] | None = None, **kw: Any) -> kubelet.Plan:
    return kubelet.plan(pod or POD, container, images=kubelet.Images(), mount_list=MOUNTS, **kw)


# -- fields, expansion, paths ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("metadata.name", "web"),
        ("metadata.namespace", "shop"),
        ("metadata.uid", "1234-abcd"),
        ("spec.nodeName", "node-1"),
        ("spec.serviceAccountName", "web"),
        ("status.podIP", "10.0.0.2"),
        ("status.podIPs", "10.0.0.2,fd00::2"),
        ("status.hostIP", "10.0.0.1"),
        ("metadata.labels['app']", "web"),
        ("metadata.annotations['b']", 'say "hi"\n'),
        ("metadata.annotations['missing']", ""),
        ("metadata.labels", 'app="web"'),
        ("metadata.annotations", 'a="1"\nb="say \\"hi\\"\\n"'),
        ("spec.containers", None),
    ],
)
def test_field_values_as_the_kubelet_renders_them(path: str, value: str | None) -> None:
    assert kubelet.field_value(POD, path) == value


def test_the_annotations_item_parses_back_to_the_annotations() -> None:
    files = kubelet.downward_files(
        [
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
            {"path": "cpu", "resourceFieldRef": {"resource": "limits.cpu"}},
        ],
        POD,
    )
    assert list(files) == ["annotations"]
    assert parse_annotations(files["annotations"]) == POD["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("$(NS).svc", "shop.svc"),
        ("$(UNSET)/x", "$(UNSET)/x"),
        ("$$(NS)", "$(NS)"),
        ("cost $$5", "cost $5"),
        ("$(NS", "$(NS"),
        ("trailing $", "trailing $"),
    ],
)
def test_variable_expansion_follows_kubernetes(text: str, expanded: str) -> None:
    assert kubelet.expand(text, {"NS": "shop"}) == expanded


def test_env_in_order_with_field_references_and_unresolved_sources_left_out() -> None:
    container = {
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "URL", "value": "http://$(POD_IP):8080"},
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "EMPTY"},
        ]
    }
    env = kubelet.container_env(POD, container)
    assert env["URL"] == "http://10.0.0.2:8080"
    assert env["EMPTY"] == "" and "SECRET" not in env
    assert env["HOSTNAME"] == "web" and env["PATH"]


@pytest.mark.parametrize(
    ("value", "mapped"),
    [
        ("/etc/podinfo/annotations", "/v/podinfo/annotations"),
        ("/etc/podinfo", "/v/podinfo"),
        ("--file=/etc/podinfo/annotations", "--file=/v/podinfo/annotations"),
        ("/etc/podinfox", "/etc/podinfox"),
        ("/work/sub/file", "/v/work/sub/file"),
        ("a=/work", "a=/work"),  # not a flag
        ("relative/work", "relative/work"),
    ],
)
def test_container_paths_under_a_mount_map_to_its_folder(value: str, mapped: str) -> None:
    assert kubelet.map_path(value, MOUNTS) == mapped


def test_mounts_with_sub_paths_and_nested_mounts_longest_first() -> None:
    container = {
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "conf", "mountPath": "/data/conf/", "subPath": "app"},
            {"name": "unknown", "mountPath": "/x"},
            {"name": "data", "mountPath": "/evil", "subPath": "../../etc"},
        ]
    }
    found = kubelet.mounts(container, {"data": Path("/v/data"), "conf": Path("/v/conf")})
    assert found == [("/data/conf", "/v/conf/app"), ("/data", "/v/data"), ("/evil", "/v/data")]
    assert kubelet.map_path("/data/conf/x", found) == "/v/conf/app/x"


# -- which program runs, as whom --------------------------------------------------------------


def test_the_project_image_runs_the_cli_and_the_waiter_gets_its_mapped_file() -> None:
    waiter = {
        "name": names.WAITER_CONTAINER,
        "image": "quay.io/x/istio-pod-network-controller:1",
        "args": ["init"],
    }
    plan = _plan(waiter)
    assert plan.kind is Kind.CLI
    assert plan.args == ("init", "--file", "/v/podinfo/annotations")
    assert (plan.uid, plan.gid) == (kubelet.APP_UID, kubelet.APP_UID)
    explicit = _plan({**waiter, "args": ["init", "--file=/etc/podinfo/annotations", "--verify"]})
    assert explicit.args == ("init", "--file=/v/podinfo/annotations", "--verify")
    entry = _plan({**waiter, "command": ["/usr/bin/istio-pod-network-controller"], "args": ["init"]})
    assert entry.kind is Kind.CLI and entry.args[0] == "init"
    other = _plan({**waiter, "command": ["python3"]})
    assert other.kind is Kind.REFUSED and "python3" in other.reason


def test_security_context_container_over_pod_and_the_proxy_default() -> None:
    pod = {**POD, "spec": {**POD["spec"], "securityContext": {"runAsUser": 3000, "runAsGroup": 3001}}}
    assert (_plan({"image": "app"}, pod).uid, _plan({"image": "app"}, pod).gid) == (3000, 3001)
    own = {"image": "app", "securityContext": {"runAsUser": 4000}}
    assert (_plan(own, pod).uid, _plan(own, pod).gid) == (4000, 3001)
    proxy = _plan({"image": "docker.io/istio/proxyv2:1.24", "args": ["proxy", "sidecar"]})
    assert (proxy.kind, proxy.uid) == (Kind.PROXY, kubelet.PROXY_UID)
    assert set(kubelet.PROXY_PORTS) <= set(proxy.tcp)


def test_istio_iptables_and_root_commands_are_refused_with_a_reason() -> None:
    istio_init = {
        "image": "docker.io/istio/proxyv2:1.24",
        "args": ["istio-iptables", "-p", "15001"],
        "securityContext": {"runAsUser": 0},
    }
    refused = _plan(istio_init)
    assert refused.kind is Kind.REFUSED and "NET_ADMIN" in refused.reason
    root = {"image": "busybox", "command": ["sh"], "securityContext": {"runAsUser": 0}}
    assert _plan(root).kind is Kind.REFUSED
    assert _plan(root, allow_root=True).kind is Kind.COMMAND
    assert _plan({"image": "docker.io/istio/proxyv2:1.24", "args": ["pilot-agent"]}).kind is Kind.REFUSED


def test_commands_run_with_expanded_mapped_words_and_apps_get_their_ports() -> None:
    command = {
        "image": "busybox",
        "command": ["sh", "-c"],
        "args": ["cat $(F)"],
        "env": [{"name": "F", "value": "/work/f"}],
    }
    plan = _plan(command)
    assert plan.kind is Kind.COMMAND and plan.args == ("sh", "-c", "cat /v/work/f")
    assert plan.env["F"] == "/v/work/f"
    app = _plan(
        {
            "image": "hello",
            "ports": [
                {"containerPort": 8080},
                {"containerPort": 53, "protocol": "UDP"},
                {"containerPort": 8080},
            ],
        }
    )
    assert (app.kind, app.tcp, app.udp) == (Kind.APP, (8080,), (53,))


# -- the atomic writer ------------------------------------------------------------------------


def test_atomic_writer_layout_swap_and_cleanup(tmp_path: Path) -> None:
    folder = tmp_path / "podinfo"
    kubelet.write_atomic(folder, {"annotations": b'a="1"', "labels": b"", "nested/file": b"x"})
    first = os.readlink(folder / "..data")
    assert first.startswith("..") and (folder / first).is_dir()
    assert os.readlink(folder / "annotations") == "..data/annotations"
    assert os.readlink(folder / "nested") == "..data/nested"
    assert (folder / "nested" / "file").read_bytes() == b"x"
    assert oct((folder / "annotations").stat().st_mode & 0o777) == oct(0o644)

    kubelet.write_atomic(folder, {"annotations": b'a="2"'})
    second = os.readlink(folder / "..data")
    assert second != first and not (folder / first).exists()
    assert (folder / "annotations").read_bytes() == b'a="2"'
    assert not (folder / "labels").is_symlink() and not (folder / "nested").is_symlink()
    assert not (folder / "..data_tmp").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(["..data", second, "annotations"])


def test_atomic_writer_skips_paths_outside_the_volume(tmp_path: Path) -> None:
    kubelet.write_atomic(tmp_path / "v", {"../escape": b"x", "/abs": b"x", "ok": b"y"})
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in (tmp_path / "v").iterdir() if not p.name.startswith("..")) == ["ok"]


# -- status ---------------------------------------------------------------------------------------


def _terminated(code: int) -> dict[str, Any]:
    return kubelet.terminated(code, started_at="t", container_id="c")


def test_phase_follows_the_kubelet() -> None:
    init = ContainerStatus("init", "i", init=True)
    app = ContainerStatus("app", "a")
    assert kubelet.phase("Always", [init], [app]) == "Pending"
    init.state = _terminated(1)
    assert kubelet.phase("Always", [init], [app]) == "Pending"
    assert kubelet.phase("Never", [init], [app]) == "Failed"
    init.state = _terminated(0)
    assert kubelet.phase("Always", [init], [app]) == "Pending"  # the app has not started
    app.state = {"running": {"startedAt": "t"}}
    assert kubelet.phase("Always", [init], [app]) == "Running"
    app.last_state, app.state = _terminated(1), {"waiting": {"reason": "CrashLoopBackOff"}}
    assert kubelet.phase("Always", [init], [app]) == "Running"  # restarting
    app.state = _terminated(0)
    assert kubelet.phase("Never", [init], [app]) == "Succeeded"
    assert kubelet.phase("Always", [init], [app]) == "Running"
    app.state = _terminated(2)
    assert kubelet.phase("OnFailure", [init], [app]) == "Running"
    assert kubelet.phase("Never", [init], [app]) == "Failed"
    sidecar = ContainerStatus("proxy", "p", init=True, sidecar=True, state={"running": {"startedAt": "t"}})
    assert kubelet.phase("Never", [sidecar, init], [app]) == "Failed"


def test_pod_status_conditions_in_the_kubelets_order_with_reasons() -> None:
    conditions = kubelet.Conditions()
    init = ContainerStatus("wait", "w", init=True, state={"running": {"startedAt": "t"}})
    app = ContainerStatus("app", "a")
    status = kubelet.pod_status(
        conditions=conditions,
        restart_policy="Always",
        sandbox_ready=True,
        pod_ips=["10.0.0.2", "fd00::2"],
        host_ips=["10.0.0.1"],
        start_time="t0",
        inits=[init],
        containers=[app],
    )
    assert [c["type"] for c in status["conditions"]] == [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Initialized"]["reason"] == "ContainersNotInitialized"
    assert by_type["Initialized"]["message"] == "containers with incomplete status: [wait]"
    assert by_type["Ready"]["message"] == "containers with unready status: [app]"
    assert by_type["PodScheduled"]["status"] == "True" and "reason" not in by_type["PodScheduled"]
    assert status["podIP"] == "10.0.0.2" and status["podIPs"] == [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}]
    assert status["hostIPs"] == [{"ip": "10.0.0.1"}]
    assert "started" not in status["initContainerStatuses"][0]
    assert status["containerStatuses"][0]["started"] is False
    before = by_type["Initialized"]["lastTransitionTime"]

    init.state, app.state, app.ready = _terminated(0), {"running": {"startedAt": "t"}}, True
    status = kubelet.pod_status(
        conditions=conditions,
        restart_policy="Always",
        sandbox_ready=True,
        pod_ips=[],
        host_ips=[],
        start_time="t0",
        inits=[init],
        containers=[app],
    )
    assert all(c["status"] == "True" for c in status["conditions"])
    assert "podIP" not in status  # a merge patch keeps what was reported
    assert conditions.since["Initialized"][0] == "True" and before


def test_exit_codes_and_back_off() -> None:
    assert kubelet.exit_code_of(-9) == 137 and kubelet.exit_code_of(3) == 3
    assert [kubelet.backoff(n, 1.0, 5.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert _terminated(0)["terminated"]["reason"] == "Completed"
    assert _terminated(1)["terminated"]["reason"] == "Error"
