"""Finding a pod's namespace among decoys, through real processes in real kubelet-style cgroups."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipnc_dev.cgroups import Driver, KubeletCgroups, mounts
from ipnc_dev.netlab import Netlab, Pod
from istio_pod_network_controller.node import locate
from istio_pod_network_controller.node.errors import LocateError
from istio_pod_network_controller.node.netns import NetnsId, netns_id_of

pytestmark = pytest.mark.kernel


@dataclass
class Node:
    """A node's worth of pods: the target, a decoy pod, and decoy processes of the target."""

    target_uid: str
    decoy_uid: str
    hostnet_uid: str
    sandbox: Pod  # the target's real sandbox
    stale: Pod  # a younger namespace also holding a process of the target (a sandbox being replaced)
    decoy: Pod
    elsewhere: Pod  # a process whose cgroup path names the target's UID outside kubepods
    cgroups: KubeletCgroups


def _started(lab: Netlab, netns: str | None, cgroups: KubeletCgroups, **where: str | Driver) -> int:
    proc = lab.sleeper(netns)
    cgroups.place(proc.pid, **where)  # type: ignore[arg-type]
    time.sleep(0.03)  # start times tick every 10 ms: keep the ages apart
    return proc.pid


@pytest.fixture
def cgroups() -> Iterator[KubeletCgroups]:
    if "v2" not in mounts():
        pytest.skip("no cgroup v2 tree mounted")
    with KubeletCgroups() as made:
        yield made
    assert made._created == [], "cgroup directories were left behind"


@pytest.fixture
def node(lab: Netlab, cgroups: KubeletCgroups) -> Node:
    target, decoy, hostnet = (str(uuid.uuid4()) for _ in range(3))
    sandbox, stale, decoy_pod, elsewhere = (
        lab.add_pod(n) for n in ("sandbox", "stale", "decoy", "elsewhere")
    )
    # Oldest first: processes that must NOT be chosen although they are older than the pause.
    _started(lab, None, cgroups, uid=target, container="hostdebug")  # in the host's namespace
    _started(lab, decoy_pod.path, cgroups, uid=decoy, container="pause")
    _started(lab, elsewhere.path, cgroups, uid=target, container="x", path=f"system.slice/pod{target}/x")
    _started(lab, None, cgroups, uid=hostnet, container="pause", driver=Driver.CGROUPFS)
    # The target: its pause, its app, then a younger process in another namespace.
    _started(lab, sandbox.path, cgroups, uid=target, container="pause")
    _started(lab, sandbox.path, cgroups, uid=target, container="app", qos="besteffort")
    _started(lab, stale.path, cgroups, uid=target, container="pause2")
    return Node(target, decoy, hostnet, sandbox, stale, decoy_pod, elsewhere, cgroups)


def found(uid: str, **kwargs: object) -> NetnsId:
    with locate.by_pod_uid(uid, **kwargs) as ns:  # type: ignore[arg-type]
        return ns.id


def test_pod_uid_finds_the_oldest_non_host_namespace_of_the_pod(node: Node) -> None:
    assert found(node.target_uid) == netns_id_of(node.sandbox.path)


def test_pod_ip_selects_among_the_pods_namespaces(node: Node) -> None:
    assert found(node.target_uid, pod_ips=[node.sandbox.ipv4]) == netns_id_of(node.sandbox.path)
    assert found(node.target_uid, pod_ips=[node.stale.ipv6]) == netns_id_of(node.stale.path)


def test_a_pod_ip_that_no_namespace_of_the_pod_holds_is_an_error(node: Node) -> None:
    with pytest.raises(LocateError, match="holds"):
        found(node.target_uid, pod_ips=[node.decoy.ipv4])


def test_another_pod_is_found_in_its_own_namespace(node: Node) -> None:
    assert found(node.decoy_uid) == netns_id_of(node.decoy.path)


def test_a_pod_in_the_host_namespace_is_refused(node: Node) -> None:
    with pytest.raises(LocateError, match="host network namespace"):
        found(node.hostnet_uid)


def test_an_unknown_pod_is_not_found(node: Node) -> None:
    with pytest.raises(LocateError, match="no process"):
        found(str(uuid.uuid4()))


@pytest.mark.parametrize(
    ("tree", "driver", "qos"),
    [
        ("v2", Driver.SYSTEMD, "burstable"),
        ("v2", Driver.SYSTEMD, "guaranteed"),
        ("v2", Driver.CGROUPFS, "besteffort"),
        ("pids", Driver.CGROUPFS, "burstable"),
        ("pids", Driver.SYSTEMD, "besteffort"),
    ],
)
def test_each_cgroup_layout_is_recognised(
    lab: Netlab, cgroups: KubeletCgroups, tree: str, driver: Driver, qos: str
) -> None:
    if tree not in mounts():
        pytest.skip(f"no {tree} cgroup tree mounted")
    uid = str(uuid.uuid4())
    pod = lab.add_pod("pod")
    _started(lab, pod.path, cgroups, uid=uid, container="pause", tree=tree, driver=driver, qos=qos)
    cgroup_text = Path(f"/proc/{lab._processes[-1].pid}/cgroup").read_text()
    assert uid.replace("-", "_" if driver is Driver.SYSTEMD else "-") in cgroup_text
    assert found(uid, pod_ips=[pod.ipv4]) == netns_id_of(pod.path)


KIND = (
    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-{qos}.slice/"
    "kubelet-kubepods-{qos}-pod{u}.slice/{c}"
)
REAL_NODE = "ipnc-rn-x-node-1/kubepods/{qos}/pod{uid}/{c}"


@pytest.mark.parametrize("tree", ["v2", "pids"])
@pytest.mark.parametrize("layout", [KIND, REAL_NODE], ids=["kind-nested-systemd", "real-node-cgroupfs"])
def test_a_nested_cgroup_root_is_recognised(
    lab: Netlab, cgroups: KubeletCgroups, tree: str, layout: str
) -> None:
    if tree not in mounts():
        pytest.skip(f"no {tree} cgroup tree mounted")
    uid = str(uuid.uuid4())
    pod = lab.add_pod("pod")
    path = layout.format(qos="burstable", uid=uid, u=uid.replace("-", "_"), c="cri-containerd-ab.scope")
    _started(lab, pod.path, cgroups, uid=uid, container="pause", tree=tree, path=path)
    assert found(uid, pod_ips=[pod.ipv4]) == netns_id_of(pod.path)
    assert found(uid, pod_ips=[pod.ipv4], scan_only=True) == netns_id_of(pod.path)


def _no_scan(proc_root: str) -> list[int]:
    raise AssertionError("scanned every process")


@pytest.mark.parametrize("tree", ["v2", "pids"])
def test_once_one_pod_is_found_the_next_ones_are_read_from_their_own_cgroup(
    lab: Netlab, cgroups: KubeletCgroups, tree: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tree not in mounts():
        pytest.skip(f"no {tree} cgroup tree mounted")
    first, second, hostnet = (str(uuid.uuid4()) for _ in range(3))
    pods = {uid: lab.add_pod(f"p{i}") for i, uid in enumerate((first, second))}
    for uid, qos in ((first, "besteffort"), (second, "guaranteed")):
        _started(lab, pods[uid].path, cgroups, uid=uid, container="pause", tree=tree, qos=qos)
        _started(lab, pods[uid].path, cgroups, uid=uid, container="app", tree=tree, qos=qos)
    _started(lab, None, cgroups, uid=hostnet, container="pause", tree=tree, qos="burstable")
    routes = locate.CgroupRoutes()
    assert found(first, pod_ips=[pods[first].ipv4], routes=routes) == netns_id_of(pods[first].path)
    assert [r.dir for r in routes.roots] == [f"{mounts()[tree]}/{cgroups.top}/kubepods.slice"]
    monkeypatch.setattr(locate, "_all_pids", _no_scan)
    assert found(second, pod_ips=[pods[second].ipv4], routes=routes) == netns_id_of(pods[second].path)
    with pytest.raises(LocateError, match="host network namespace"):
        found(hostnet, routes=routes)
    with pytest.raises(LocateError, match="holds"):
        found(second, pod_ips=[pods[first].ipv4], routes=routes)


def test_the_pods_own_cgroup_gives_the_same_answer_as_the_scan(node: Node) -> None:
    routes = locate.CgroupRoutes()
    found(node.decoy_uid, routes=routes)  # teaches the layout
    assert routes.roots
    for ips in ([], [node.sandbox.ipv4], [node.stale.ipv6]):
        assert found(node.target_uid, pod_ips=ips, routes=routes) == found(
            node.target_uid, pod_ips=ips, scan_only=True
        )


def test_a_different_proc_root_is_used_for_paths(node: Node) -> None:
    with tempfile.TemporaryDirectory() as root:
        subprocess.run(["mount", "-t", "proc", "proc", root], check=True)  # noqa: S603
        try:
            with locate.by_pod_uid(node.target_uid, proc_root=root) as ns:
                assert ns.path.startswith(root + "/")
                assert ns.id == netns_id_of(node.sandbox.path)
        finally:
            subprocess.run(["umount", root], check=True)  # noqa: S603


def test_explicit_path_and_pid(lab: Netlab) -> None:
    pod = lab.add_pod("pod")
    sleeper = lab.sleeper(pod.path)
    with locate.by_path(pod.path) as by_path, locate.by_pid(sleeper.pid) as by_pid:
        assert by_path.id == by_pid.id == netns_id_of(pod.path)


def test_explicit_host_namespace_is_refused() -> None:
    with pytest.raises(LocateError, match="host"):
        locate.by_path("/proc/self/ns/net")
    with pytest.raises(LocateError, match="host"):
        locate.by_pid(os.getpid())


def test_a_file_that_is_not_a_network_namespace_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(LocateError, match="not a namespace"):
        locate.by_path(str(plain))
    with pytest.raises(LocateError, match="not a network one"):
        locate.by_path("/proc/self/ns/mnt")
    with pytest.raises(LocateError, match="does not exist"):
        locate.by_path(str(tmp_path / "missing"))
