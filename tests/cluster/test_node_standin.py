"""The node stand-in against the real API server and the real kernel (issue 4, acceptance point 3):
a pod bound to its node gets a network namespace with its IP, a kubelet's status, a downward API
file that follows its annotations within a second, init containers before containers, crash-loop
restarts, and a clean teardown on deletion. No agent runs here: where the agent would act, the
test does by hand (the mark on the pod, an iptables rule)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, codecs
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from ipnc_dev.cgroups import mounts
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.netlab import namespaces_with_prefix
from ipnc_dev.standin import NodeStandIn, PodView
from istio_pod_network_controller import names
from istio_pod_network_controller.node.locate import by_pod_uid, in_pod_cgroup
from istio_pod_network_controller.podinfo import format_annotations, parse_annotations

pytestmark = pytest.mark.cluster

PROJECT_IMAGE = "registry.example/istio-pod-network-controller:dev"
PROXY_IMAGE = "registry.example/istio/proxyv2:1.24"
APP_IMAGE = "registry.example/hello:1"
SHELL_IMAGE = "registry.example/busybox:1"
PROXY_ARGS = ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"]


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the node stand-in needs root (network namespaces, cgroups)")
    for binary in ("ip", "nsenter", "setpriv", "iptables"):
        if shutil.which(binary) is None:
            pytest.skip(f"the node stand-in needs {binary}")


def _standin(control_plane: ControlPlane, name: str | None = None) -> NodeStandIn:
    return NodeStandIn(
        name or f"node-{uuid.uuid4().hex[:8]}",
        control_plane.kubeconfig_path,
        ipv6=True,
        backoff_initial=0.2,
        backoff_max=0.8,
        stop_timeout=3.0,
    )


def _assert_nothing_left(standin: NodeStandIn) -> None:
    assert standin.lab is not None
    assert namespaces_with_prefix(standin.lab.prefix) == [], "namespaces left behind"
    for mount in mounts().values():
        assert not (mount / standin.cgroup_top).exists(), f"cgroups left in {mount}"
    assert not standin.workdir.exists(), "files left behind"


@pytest.fixture
def node(control_plane: ControlPlane) -> Iterator[NodeStandIn]:
    """A stand-in for a node name of this test's own (pods of other tests stay unseen)."""
    _needs_root()
    with _standin(control_plane) as standin:
        yield standin
    _assert_nothing_left(standin)


def _pod(name: str, namespace: str, node: str, **spec: Any) -> Pod:
    annotations = spec.pop("annotations", {})
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 2, **spec},
    }
    pod = codecs.from_dict(body)
    assert isinstance(pod, Pod)
    return pod


def _status(kube: Client, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = kube.get(Pod, name, namespace=namespace).to_dict().get("status") or {}
    return status


def _eventually(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}; last: {value!r}")
        time.sleep(0.02)


def _running(view: PodView) -> bool:
    return view.phase == "Running" and all(c.ready for c in view.containers.values() if not c.init)


def _app(name: str = "app", **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": APP_IMAGE, "ports": [{"containerPort": 8080}], **extra}


def _proxy() -> dict[str, Any]:
    env = [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    return {"name": "istio-proxy", "image": PROXY_IMAGE, "args": PROXY_ARGS, "env": env}


def _shell(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": SHELL_IMAGE, "command": ["sh", "-c", script], **extra}


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _memory_cgroup(pid: int | str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.split(":")[1] == "memory":
            return line
    return ""


def _netns_holders(inode: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino == inode:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _mark(kube: Client, namespace: str, name: str, inode: int) -> None:
    """What the agent writes once the rules are in place (the waiter checks the inode)."""
    detail = {"netnsInode": inode, "rulesetSha256": "f" * 64, "appliedAt": "2026-01-01T00:00:00Z"}
    annotations = {names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: json.dumps(detail)}
    kube.patch(
        Pod, name, {"metadata": {"annotations": annotations}}, namespace=namespace, patch_type=PatchType.MERGE
    )


# -- the sandbox and the status --------------------------------------------------------------


def test_pod_gets_a_namespace_with_its_ips_processes_the_agent_finds_and_a_kubelet_status(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    kube.create(_pod("web", namespace, node.node_name, containers=[_app(), _proxy()]))
    view = node.wait_for(namespace, "web", _running)

    # A real namespace holding the pod's IPv4 and IPv6 addresses, and the pause process inside it.
    assert Path(view.netns).exists() and os.stat(view.netns).st_ino == view.netns_inode
    assert view.ipv4 and view.ipv6
    shown = subprocess.run(  # noqa: S603
        ["nsenter", f"--net={view.netns}", "ip", "-j", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    local = {a["local"] for link in json.loads(shown.stdout) for a in link["addr_info"]}
    assert {view.ipv4, view.ipv6} <= local
    assert view.sandbox_pid is not None
    assert os.stat(f"/proc/{view.sandbox_pid}/ns/net").st_ino == view.netns_inode

    # Laid out as on a node: the agent's own /proc scan finds this namespace by the pod's UID; the
    # memory cgroup (which would impose limits) is the one the process inherited.
    cgroup_text = Path(f"/proc/{view.sandbox_pid}/cgroup").read_text()
    assert in_pod_cgroup(cgroup_text, view.uid)
    assert "kubepods" in cgroup_text and view.uid.replace("-", "_") in cgroup_text
    assert _memory_cgroup(view.sandbox_pid) == _memory_cgroup("self")
    with by_pod_uid(view.uid, pod_ips=[view.ipv4]) as found:
        assert found.inode == view.netns_inode

    # Containers run in the pod's namespace as their users: the app as 1000, the proxy as 1337.
    app, proxy = view.container("app"), view.container("istio-proxy")
    assert (app.kind, proxy.kind) == ("app", "proxy")
    for container, uid in ((app, 1000), (proxy, 1337)):
        for pid in container.pids:
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == view.netns_inode
            assert _uid_of(pid) == uid
            assert in_pod_cgroup(Path(f"/proc/{pid}/cgroup").read_text(), view.uid)

    # The status, as the kubelet reports it. The stand-in's view turns ready before the status
    # patch that says so reaches the API server: wait for the API to show Ready, then check it all.
    def ready_status() -> dict[str, Any] | None:
        status = _status(kube, namespace, "web")
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        return status if conditions.get("Ready") == "True" else None

    status = _eventually("the API shows the pod Ready", ready_status)
    assert status["phase"] == "Running"
    assert status["podIP"] == view.ipv4
    assert [i["ip"] for i in status["podIPs"]] == [view.ipv4, view.ipv6]
    assert status["hostIP"] == view.host_ip
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    for cs in status["containerStatuses"]:
        assert cs["ready"] and cs["started"] and "running" in cs["state"]
        assert cs["restartCount"] == 0 and cs["containerID"].startswith("containerd://")


# -- init containers ---------------------------------------------------------------------------


def test_init_containers_run_in_order_in_the_pod_namespace_before_the_containers(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    work = [{"name": "work", "mountPath": "/work"}]
    env = [{"name": "DIR", "value": "/work"}]
    line = 'echo "$0 $(id -u) $(readlink /proc/self/ns/net)" > "$DIR/$0"'
    kube.create(
        _pod(
            "ordered",
            namespace,
            node.node_name,
            initContainers=[
                _shell("one", line.replace("$0", "one"), volumeMounts=work, env=env),
                _shell("two", "sleep 1; " + line.replace("$0", "two"), volumeMounts=work, env=env),
            ],
            containers=[
                _shell(
                    "main",
                    'cat "$DIR/one" "$DIR/two" > "$DIR/main-saw"; id -u >> "$DIR/main-saw"; '
                    "exec sleep infinity",
                    volumeMounts=work,
                    env=env,
                    securityContext={"runAsUser": 2000, "runAsGroup": 2000},
                )
            ],
            volumes=[{"name": "work", "emptyDir": {}}],
        )
    )
    # While "two" runs, the pod is initializing, as the kubelet reports it.
    node.wait_for(namespace, "ordered", lambda v: v.container("two").state == "running")
    status = _eventually(
        "status shows two running",
        lambda: (
            (s := _status(kube, namespace, "ordered"))
            and "running" in s["initContainerStatuses"][1]["state"]
            and s
        ),
    )
    assert status["phase"] == "Pending"
    initialized = next(c for c in status["conditions"] if c["type"] == "Initialized")
    assert initialized["status"] == "False" and initialized["reason"] == "ContainersNotInitialized"
    assert "two" in initialized["message"]
    assert "terminated" in status["initContainerStatuses"][0]["state"]
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}

    view = node.wait_for(namespace, "ordered", _running)
    folder = view.volume_dirs["work"]
    saw = _eventually("main wrote what it saw", lambda: (folder / "main-saw").read_text().split("\n"))
    inode = f"net:[{view.netns_inode}]"
    assert saw[:3] == [f"one 1000 {inode}", f"two 1000 {inode}", "2000"]
    assert view.container("one").exit_codes == (0,) and view.container("two").exit_codes == (0,)
    status = _status(kube, namespace, "ordered")
    assert [c["state"]["terminated"]["reason"] for c in status["initContainerStatuses"]] == ["Completed"] * 2
    assert all(c["ready"] for c in status["initContainerStatuses"])


def test_a_failing_init_container_is_restarted_with_back_off_and_its_last_lines_kept(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    script = 'n=$(( $(cat "$DIR/n" 2>/dev/null || echo 0) + 1 )); echo $n > "$DIR/n"; '
    script += 'echo "attempt $n"; [ $n -ge 3 ]'
    flaky = _shell(
        "flaky",
        script,
        volumeMounts=[{"name": "state", "mountPath": "/state"}],
        env=[{"name": "DIR", "value": "/state"}],
        terminationMessagePolicy="FallbackToLogsOnError",
    )
    started = time.monotonic()
    kube.create(
        _pod(
            "flaky",
            namespace,
            node.node_name,
            initContainers=[flaky],
            containers=[_app()],
            volumes=[{"name": "state", "emptyDir": {}}],
        )
    )
    # The status shows the crash loop: waiting in back-off, the last run's end, the restart count.
    status = _eventually(
        "CrashLoopBackOff after the first failure",
        lambda: (
            (s := _status(kube, namespace, "flaky"))
            and s.get("initContainerStatuses")
            and s["initContainerStatuses"][0]["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"
            and s
        ),
    )
    flaky_status = status["initContainerStatuses"][0]
    assert "back-off" in flaky_status["state"]["waiting"]["message"]
    last = flaky_status["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (1, "Error")
    assert last["message"].splitlines()[-1].startswith("attempt ")
    assert status["phase"] == "Pending"
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}

    view = node.wait_for(namespace, "flaky", _running)
    assert time.monotonic() - started >= 0.2 + 0.4  # two back-offs: 0.2 s, then 0.4 s
    container = view.container("flaky")
    assert container.exit_codes == (1, 1, 0)
    assert container.restart_count == 2
    assert node.logs(view.uid, "flaky").strip() == "attempt 3"
    assert node.logs(view.uid, "flaky", previous=True).strip() == "attempt 2"
    final = _status(kube, namespace, "flaky")["initContainerStatuses"][0]
    assert final["restartCount"] == 2 and final["state"]["terminated"]["reason"] == "Completed"
    assert final["lastState"]["terminated"]["message"].strip() == "attempt 2"


def test_an_istio_init_left_in_the_pod_is_not_run_and_says_why(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    istio_init = {
        "name": "istio-init",
        "image": PROXY_IMAGE,
        "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"],
        "securityContext": {"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}},
    }
    kube.create(
        _pod("unconverted", namespace, node.node_name, initContainers=[istio_init], containers=[_app()])
    )
    status = _eventually(
        "istio-init reported as a StartError",
        lambda: (
            (s := _status(kube, namespace, "unconverted"))
            and s.get("initContainerStatuses")
            and "terminated" in s["initContainerStatuses"][0]["lastState"]
            and s
        ),
    )
    ended = status["initContainerStatuses"][0]["lastState"]["terminated"]
    assert (ended["exitCode"], ended["reason"]) == (128, "StartError")
    assert "NET_ADMIN" in ended["message"]
    assert status["phase"] == "Pending"
    view = node.find(namespace, "unconverted")
    assert view is not None and view.container("app").state == "waiting"
    rules = subprocess.run(  # noqa: S603
        ["nsenter", f"--net={view.netns}", "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    assert "ISTIO" not in rules.stdout


# -- the downward API and the project's own init container --------------------------------------


def test_the_waiter_reads_the_downward_api_file_which_follows_annotations_within_a_second(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    waiter = {
        "name": names.WAITER_CONTAINER,
        "image": PROJECT_IMAGE,
        "args": [names.WAITER_SUBCOMMAND, "--file", names.ANNOTATIONS_FILE, "--timeout", "120"],
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
        "volumeMounts": [{"name": names.PODINFO_VOLUME, "mountPath": names.PODINFO_PATH, "readOnly": True}],
    }
    volume = {
        "name": names.PODINFO_VOLUME,
        "downwardAPI": {
            "items": [{"path": names.PODINFO_ANNOTATIONS, "fieldRef": {"fieldPath": "metadata.annotations"}}]
        },
    }
    kube.create(
        _pod(
            "meshed",
            namespace,
            node.node_name,
            annotations={"first": "1"},
            initContainers=[waiter],
            containers=[_app()],
            volumes=[volume],
        )
    )
    view = node.wait_for(
        namespace, "meshed", lambda v: v.container(names.WAITER_CONTAINER).state == "running"
    )
    assert view.container(names.WAITER_CONTAINER).kind == "cli"
    folder = view.volume_dirs[names.PODINFO_VOLUME]
    file = folder / names.PODINFO_ANNOTATIONS
    # The kubelet's atomic-writer layout: the file is a symlink through ..data to a version folder.
    assert os.readlink(file) == f"..data/{names.PODINFO_ANNOTATIONS}"
    assert (folder / "..data").is_symlink() and os.readlink(folder / "..data").startswith("..")
    assert parse_annotations(file.read_bytes()) == {"first": "1"}

    # A change reaches the file within a second, byte for byte in the kubelet's format.
    hostile = 'quote " backslash \\ newline \n tab \t caf\u00e9 \u2603 \x01 end'
    changed = time.monotonic()
    kube.patch(
        Pod,
        "meshed",
        {"metadata": {"annotations": {"second": hostile}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    expected = {"first": "1", "second": hostile}
    _eventually(
        "the new annotation in the file", lambda: parse_annotations(file.read_bytes()) == expected, 1.0
    )
    assert time.monotonic() - changed < 1.0
    assert file.read_text() == format_annotations(expected)

    # The real waiter (the project's CLI, unprivileged) still waits, then passes on the mark for
    # this pod's namespace; the containers start after it.
    assert node.wait_for(namespace, "meshed").container("app").state == "waiting"
    _mark(kube, namespace, "meshed", view.netns_inode)
    view = node.wait_for(namespace, "meshed", _running, timeout=30)
    waiter_view = view.container(names.WAITER_CONTAINER)
    assert waiter_view.exit_codes == (0,)
    assert "istio-pod-network-controller init:" in node.logs(view.uid, names.WAITER_CONTAINER)


# -- deletion and sandbox replacement --------------------------------------------------------------


def test_deletion_stops_everything_and_removes_namespace_veth_cgroups_and_files(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    kube.create(
        _pod(
            "doomed",
            namespace,
            node.node_name,
            initContainers=[_shell("init", "true")],
            containers=[_app(), _proxy(), _shell("sleeper", "exec sleep infinity")],
            volumes=[{"name": "scratch", "emptyDir": {}}],
        )
    )
    view = node.wait_for(namespace, "doomed", _running)
    pids = [view.sandbox_pid, *(p for c in view.containers.values() for p in c.pids)]
    assert len(pids) == 5  # pause, app (client and server), proxy, sleeper
    assert view.veth and view.cgroup_dirs and all(d.is_dir() for d in view.cgroup_dirs)

    kube.delete(Pod, "doomed", namespace=namespace)  # graceful: the stand-in confirms it

    def deleted() -> bool:
        try:
            kube.get(Pod, "doomed", namespace=namespace)
        except ApiError as exc:
            return exc.status.code == 404
        return False

    _eventually("the API object deleted by the stand-in's confirmation", deleted)
    node.wait_gone(view.uid)
    assert not Path(view.netns).exists()
    assert _netns_holders(view.netns_inode) == []
    assert [pid for pid in pids if pid is not None and Path(f"/proc/{pid}").exists()] == []
    links = subprocess.run(  # noqa: S603
        ["nsenter", f"--net={view.node_netns}", "ip", "-j", "link", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert view.veth not in {link["ifname"] for link in json.loads(links.stdout)}
    for directory in (*view.cgroup_dirs, *view.pod_cgroup_dirs):
        assert not directory.exists()
    assert not view.volume_dirs["scratch"].exists()


def test_recreated_sandbox_gets_a_new_namespace_and_reruns_the_init_containers(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    waiter = {
        "name": names.WAITER_CONTAINER,
        "image": PROJECT_IMAGE,
        "args": [names.WAITER_SUBCOMMAND, "--timeout", "120"],  # default file: mapped by the stand-in
        "volumeMounts": [{"name": "podinfo", "mountPath": names.PODINFO_PATH}],
    }
    volume = {
        "name": "podinfo",
        "downwardAPI": {
            "items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
        },
    }
    kube.create(
        _pod(
            "phoenix",
            namespace,
            node.node_name,
            initContainers=[waiter],
            containers=[_app()],
            volumes=[volume],
        )
    )
    first = node.wait_for(namespace, "phoenix")
    _mark(kube, namespace, "phoenix", first.netns_inode)
    first = node.wait_for(namespace, "phoenix", _running)

    second = node.recreate_sandbox(first.uid)
    assert second.generation == 1
    assert second.netns_inode != first.netns_inode and second.netns != first.netns
    assert second.ipv4 != first.ipv4
    assert not Path(first.netns).exists() and _netns_holders(first.netns_inode) == []
    _eventually(
        "the new pod IP reported", lambda: _status(kube, namespace, "phoenix").get("podIP") == second.ipv4
    )

    # The waiter runs again and does not pass on the old sandbox's mark, then passes on the new one.
    view = node.wait_for(
        namespace, "phoenix", lambda v: v.container(names.WAITER_CONTAINER).state == "running"
    )
    assert view.container(names.WAITER_CONTAINER).restart_count == 1
    time.sleep(0.5)
    view = node.wait_for(namespace, "phoenix")
    assert view.phase == "Pending" and view.container(names.WAITER_CONTAINER).state == "running"
    _mark(kube, namespace, "phoenix", second.netns_inode)
    view = node.wait_for(namespace, "phoenix", _running)
    assert view.container("app").restart_count == 1
    assert os.stat(f"/proc/{view.container('app').pid}/ns/net").st_ino == second.netns_inode


# -- traffic, and two nodes ------------------------------------------------------------------------


def test_the_app_stub_connects_from_the_pod_and_the_stub_proxy_records_redirected_connections(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    kube.create(_pod("talker", namespace, node.node_name, containers=[_app(), _proxy()]))
    view = node.wait_for(namespace, "talker", _running)

    # Without rules, nothing answers at a documentation address (the lab has no uplink).
    assert not node.app_request(view.uid, "app", "192.0.2.1", 80, timeout=0.5)["ok"]
    # The app's own server answers on the pod IP.
    direct = node.app_request(view.uid, "app", view.ipv4 or "", 8080)
    assert direct["ok"] and direct["reply"]["server"] == "app" and direct["reply"]["orig"] is None

    # What the agent would do, by hand: redirect the app's outbound TCP to the proxy.
    for tool, target in (("iptables", "192.0.2.1"), ("ip6tables", "2001:db8::1")):
        subprocess.run(  # noqa: S603
            [
                "nsenter",
                f"--net={view.netns}",
                tool,
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                target,
                "-m",
                "owner",
                "!",
                "--uid-owner",
                "1337",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
            check=True,
            capture_output=True,
            timeout=10,
        )
    for target in ("192.0.2.1", "2001:db8::1"):
        answer = node.app_request(view.uid, "app", target, 80)
        assert answer["ok"], answer
        reply = answer["reply"]
        assert (reply["server"], reply["port"], reply["orig"], reply["uid"]) == (
            "istio-proxy",
            15001,
            [target, 80],
            1337,
        )
    recorded = node.connections(view.uid, "istio-proxy")
    assert [(r["orig"][0], r["orig"][1]) for r in recorded] == [("192.0.2.1", 80), ("2001:db8::1", 80)]


def test_two_node_stand_ins_coexist_each_with_its_own_pods_and_addresses(
    control_plane: ControlPlane, kube: Client, namespace: str
) -> None:
    _needs_root()
    with _standin(control_plane) as one, _standin(control_plane) as two:
        for standin in (one, two):
            for index in range(2):
                kube.create(
                    _pod(f"{standin.node_name}-{index}", namespace, standin.node_name, containers=[_app()])
                )
        views = []
        for standin in (one, two):
            mine = [standin.wait_for(namespace, f"{standin.node_name}-{i}", _running) for i in range(2)]
            assert {v.name for v in standin.pods()} == {v.name for v in mine}
            views += mine
        addresses = [ip for v in views for ip in v.ips]
        assert len(set(addresses)) == len(addresses) == 8
        assert len({v.netns_inode for v in views}) == 4
        for v in views:
            status = _status(kube, namespace, v.name)
            assert status["podIP"] == v.ipv4 and status["phase"] == "Running"
    _assert_nothing_left(one)
    _assert_nothing_left(two)


# -- native sidecars and projected volumes -----------------------------------------------------


def test_a_native_sidecar_is_listening_before_the_next_init_container_and_keeps_running(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    sidecar = {**_proxy(), "restartPolicy": "Always"}
    # 15001 = 0x3A99, in state 0A (LISTEN), in this namespace's /proc/net/tcp.
    check = _shell("after-proxy", "grep -q ':3A99 00000000:0000 0A' /proc/net/tcp")
    kube.create(
        _pod("native", namespace, node.node_name, initContainers=[sidecar, check], containers=[_app()])
    )
    view = node.wait_for(namespace, "native", _running)
    assert view.container("after-proxy").exit_codes == (0,)
    proxy = view.container("istio-proxy")
    assert proxy.init and proxy.state == "running" and proxy.ready and proxy.restart_count == 0
    status = _status(kube, namespace, "native")
    sidecar_status = status["initContainerStatuses"][0]
    assert sidecar_status["started"] and sidecar_status["ready"] and "running" in sidecar_status["state"]
    assert next(c for c in status["conditions"] if c["type"] == "Initialized")["status"] == "True"


def test_projected_volumes_carry_a_bound_service_account_token_and_downward_files(
    control_plane: ControlPlane, node: NodeStandIn, kube: Client, namespace: str
) -> None:
    control_plane.service_account_token(namespace, "reader")  # creates the ServiceAccount
    projected = {
        "name": "tokens",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "path": "istio-token",
                        "audience": "istio-ca",
                        "expirationSeconds": 3600,
                    }
                },
                {
                    "downwardAPI": {
                        "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
                    }
                },
                {"configMap": {"name": "absent-and-optional", "optional": True}},
            ]
        },
    }
    mount = [{"name": "tokens", "mountPath": "/var/run/secrets/tokens"}]
    kube.create(
        _pod(
            "bound",
            namespace,
            node.node_name,
            serviceAccountName="reader",
            containers=[_app(volumeMounts=mount)],
            volumes=[projected],
        )
    )
    view = node.wait_for(namespace, "bound", _running)
    folder = view.volume_dirs["tokens"]
    assert (folder / "labels").read_text() == ""
    token = (folder / "istio-token").read_text()
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["aud"] == ["istio-ca"]
    assert payload["kubernetes.io"]["pod"] == {"name": "bound", "uid": view.uid}
    assert payload["kubernetes.io"]["serviceaccount"]["name"] == "reader"
    assert view.notes == ()

    # A ServiceAccount that does not exist gives no token (the API server refuses a projected token
    # without a serviceAccountName at all): the pod still runs here, and says why the file is missing.
    kube.create(
        _pod(
            "unbound",
            namespace,
            node.node_name,
            serviceAccountName="nobody",
            containers=[_app(volumeMounts=mount)],
            volumes=[projected],
        )
    )
    view = node.wait_for(namespace, "unbound", _running)
    assert not (view.volume_dirs["tokens"] / "istio-token").exists()
    assert any("serviceAccountToken" in note for note in view.notes)


def test_restart_policy_never_fails_the_pod_on_a_failing_init_container(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    kube.create(
        _pod(
            "once",
            namespace,
            node.node_name,
            restartPolicy="Never",
            initContainers=[_shell("fails", "echo no; exit 3")],
            containers=[_app()],
        )
    )
    view = node.wait_for(namespace, "once", lambda v: v.phase == "Failed")
    assert view.container("fails").exit_codes == (3,) and view.container("app").state == "waiting"
    status = _eventually(
        "phase Failed reported", lambda: (s := _status(kube, namespace, "once"))["phase"] == "Failed" and s
    )
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert status["initContainerStatuses"][0]["restartCount"] == 0


def test_a_host_network_pod_runs_in_the_node_namespace_with_the_node_ip(
    node: NodeStandIn, kube: Client, namespace: str
) -> None:
    kube.create(_pod("hostnet", namespace, node.node_name, hostNetwork=True, containers=[_app()]))
    view = node.wait_for(namespace, "hostnet", _running)
    assert view.netns == view.node_netns and view.ipv4 == view.host_ip and not view.veth
    assert _status(kube, namespace, "hostnet")["podIP"] == view.host_ip
    kube.delete(Pod, "hostnet", namespace=namespace)
    node.wait_gone(view.uid)
    assert Path(view.node_netns).exists()  # the node's namespace stays
