"""The locator on real cgroup layouts: which /proc/PID/cgroup texts are a pod's, where the kubelet
keeps pod cgroups, and finding a pod's processes from its own cgroup instead of every process."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from istio_pod_network_controller.node import locate
from istio_pod_network_controller.node.errors import LocateError

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cgroup"


@dataclass(frozen=True)
class Case:
    file: str
    uid: str
    match: bool
    source: str
    kubepods: str | None = None
    systemd_stem: str | None = None

    @property
    def text(self) -> str:
        return (FIXTURES / self.file).read_text()


CASES = [Case(**c) for c in json.loads((FIXTURES / "cases.json").read_text())]
POSITIVE = [c for c in CASES if c.match]
LEARNABLE = [c for c in POSITIVE if c.kubepods is not None]


def _id(case: Case) -> str:
    return case.file.removesuffix(".cgroup") + ("" if case.match else f"[{case.uid[:8]}]")


def _pod_dir(case: Case) -> str:
    """The pod cgroup's path, cut from the fixture's first line that names it."""
    for line in case.text.splitlines():
        segments = line.split(":", 2)[2].split("/")
        i = locate.pod_segment(segments, case.uid)
        if i is not None:
            return "/".join(segments[: i + 1])
    raise AssertionError(f"{case.file}: no pod segment")


def test_the_fixtures_cover_every_layout_of_the_issue() -> None:
    names = {c.file for c in CASES}
    for prefix in ("realnode-node-1", "realnode-node-2", "systemd-v1", "systemd-v2", "kind-v1", "kind-v2"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert len([c for c in CASES if not c.match]) >= 10
    assert all((FIXTURES / c.file).is_file() for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fixture_is_recognised_as_the_pods_exactly_when_it_is(case: Case) -> None:
    assert locate.in_pod_cgroup(case.text, case.uid) is case.match, case.source


@pytest.mark.parametrize("case", POSITIVE, ids=_id)
def test_upper_case_uid_is_the_same_pod(case: Case) -> None:
    assert locate.in_pod_cgroup(case.text, case.uid.upper())


def test_real_node_pods_are_not_each_others() -> None:
    real = [c for c in POSITIVE if c.file.startswith("realnode-")]
    assert len(real) == 6
    for case in real:
        for other in real:
            assert locate.in_pod_cgroup(case.text, other.uid) is (case.uid == other.uid)


@pytest.mark.parametrize("case", LEARNABLE, ids=_id)
def test_the_kubelets_root_and_naming_are_learned_from_a_pods_path(case: Case) -> None:
    learned = {
        locate.kubelet_root_of(line.split(":", 2)[2], case.uid) for line in case.text.splitlines()
    } - {None}
    assert learned == {(case.kubepods, case.systemd_stem)}


@pytest.mark.parametrize("case", LEARNABLE, ids=_id)
def test_the_learned_root_leads_back_to_the_pods_directory(case: Case) -> None:
    assert case.kubepods is not None
    root = locate.KubeletRoot(case.kubepods, case.systemd_stem)
    assert _pod_dir(case) in root.pod_dirs(case.uid)


def test_a_root_learned_from_one_real_pod_leads_to_the_nodes_other_pods() -> None:
    for node in ("node-1", "node-2"):
        pods = [c for c in LEARNABLE if c.file.startswith(f"realnode-{node}-")]
        assert len(pods) == 3  # one per QoS class
        teacher = pods[0]
        learned = locate.kubelet_root_of(teacher.text.splitlines()[0].split(":", 2)[2], teacher.uid)
        assert learned is not None
        root = locate.KubeletRoot(*learned)
        for pod in pods:
            assert _pod_dir(pod) in root.pod_dirs(pod.uid)
        other = next(c for c in LEARNABLE if c.file.startswith("realnode-") and node not in c.file)
        assert _pod_dir(other) not in root.pod_dirs(other.uid)


def test_nothing_is_learned_through_a_cgroup_namespace() -> None:
    for case in POSITIVE:
        if case.file.startswith("cgroupns-"):
            assert case.kubepods is None
            assert all(
                locate.kubelet_root_of(line.split(":", 2)[2], case.uid) is None
                for line in case.text.splitlines()
            )


# -- the cgroup mounts we can read -----------------------------------------------------------------

MOUNTINFO = r"""22 1 0:21 / /proc rw,nosuid - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
50 49 0:36 /kubepods/burstable/podA/c1 /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids
51 49 0:38 / /host/sys/fs/cgroup\040x rw - cgroup2 cgroup2 rw
"""


def test_cgroup_mounts_are_read_from_mountinfo() -> None:
    mounts = locate.parse_cgroup_mounts(MOUNTINFO)
    assert [m.path for m in mounts] == [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/pids",
        "/host/sys/fs/cgroup x",
    ]
    assert mounts[1].controllers is not None and "name=systemd" in mounts[1].controllers
    assert mounts[3].controllers is None
    assert mounts[4].root == "/kubepods/burstable/podA/c1"


@dataclass
class Tree:
    """A fake cgroup hierarchy on disk with the mountinfo that says where it is mounted."""

    base: Path
    mountinfo: Path

    def pod(self, relative: str, pids_by_container: dict[str, list[int]]) -> None:
        pod = self.base / relative.lstrip("/")
        pod.mkdir(parents=True, exist_ok=True)
        (pod / "cgroup.procs").write_text("")
        for name, pids in pids_by_container.items():
            (pod / name).mkdir()
            (pod / name / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    base = tmp_path / "pids"
    base.mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"39 31 0:36 / {base} rw - cgroup cgroup rw,pids\n")
    return Tree(base, mountinfo)


REAL_BESTEFFORT = next(c for c in LEARNABLE if c.file == "realnode-node-1-besteffort-pause.cgroup")
REAL_GUARANTEED = next(c for c in LEARNABLE if c.file == "realnode-node-1-guaranteed-pause.cgroup")


def test_routes_learn_a_real_nodes_root_and_read_the_next_pods_processes(tree: Tree) -> None:
    tree.pod(_pod_dir(REAL_BESTEFFORT), {"pause": [101], "app": [102, 103]})
    tree.pod(_pod_dir(REAL_GUARANTEED), {"pause": [201], "app": [202]})
    routes = locate.CgroupRoutes(str(tree.mountinfo))
    assert routes.pids(REAL_GUARANTEED.uid) == []  # nothing learned yet
    learned = routes.learn(REAL_BESTEFFORT.text, REAL_BESTEFFORT.uid)
    assert learned == locate.KubeletRoot(f"{tree.base}{REAL_BESTEFFORT.kubepods}", None)
    assert sorted(routes.pids(REAL_GUARANTEED.uid) or []) == [201, 202]
    assert sorted(routes.pids(REAL_BESTEFFORT.uid) or []) == [101, 102, 103]
    assert routes.pids("11111111-2222-3333-4444-555555555555") == []


def test_routes_learn_kinds_nested_systemd_root(tmp_path: Path) -> None:
    case = next(c for c in LEARNABLE if c.file == "kind-v2-burstable.cgroup")
    base = tmp_path / "unified"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"41 31 0:38 / {base} rw - cgroup2 cgroup2 rw\n")
    Tree(base, mountinfo).pod(_pod_dir(case), {"cri-containerd-x.scope": [7]})
    routes = locate.CgroupRoutes(str(mountinfo))
    assert routes.learn(case.text, case.uid) == locate.KubeletRoot(
        f"{base}/kubelet.slice/kubelet-kubepods.slice", "kubelet-kubepods"
    )
    assert routes.pids(case.uid) == [7]


def test_a_mount_of_only_our_own_container_teaches_nothing(tmp_path: Path) -> None:
    # What a container gets on cgroup v1 without the host's cgroup tree: its own subtree.
    base = tmp_path / "pids"
    base.mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"50 49 0:36 /kubepods/burstable/podA/c1 {base} ro - cgroup cgroup rw,pids\n")
    routes = locate.CgroupRoutes(str(mountinfo))
    assert routes.learn(REAL_BESTEFFORT.text, REAL_BESTEFFORT.uid) is None
    assert routes.roots == ()


def test_a_mount_of_another_hierarchy_teaches_nothing(tmp_path: Path) -> None:
    case = next(c for c in LEARNABLE if c.file == "systemd-v2-besteffort.cgroup")  # a cgroup2 path
    base = tmp_path / "pids"
    (base / "kubepods.slice").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"39 31 0:36 / {base} rw - cgroup cgroup rw,pids\n")
    assert locate.CgroupRoutes(str(mountinfo)).learn(case.text, case.uid) is None


def test_a_root_that_went_away_is_forgotten(tree: Tree) -> None:
    tree.pod(_pod_dir(REAL_BESTEFFORT), {"pause": [101]})
    routes = locate.CgroupRoutes(str(tree.mountinfo))
    assert routes.learn(REAL_BESTEFFORT.text, REAL_BESTEFFORT.uid) is not None
    kubepods = Path(routes.roots[0].dir)
    for d in sorted(kubepods.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        d.unlink() if d.is_file() else d.rmdir()
    kubepods.rmdir()
    assert routes.pids(REAL_BESTEFFORT.uid) == []
    assert routes.roots == ()


def test_a_pods_cgroup_is_read_with_its_containers_and_their_sub_cgroups(tmp_path: Path) -> None:
    pod = tmp_path / "pod"
    (pod / "pause").mkdir(parents=True)
    (pod / "app" / "nested").mkdir(parents=True)
    (pod / "cgroup.procs").write_text("")
    (pod / "pause" / "cgroup.procs").write_text("1\n")
    (pod / "app" / "cgroup.procs").write_text("2\n3\nnot-a-pid\n")
    (pod / "app" / "nested" / "cgroup.procs").write_text("4\n")
    assert sorted(locate.pids_under(str(pod)) or []) == [1, 2, 3, 4]
    assert locate.pids_under(str(tmp_path / "missing")) == []


def test_a_cgroup_too_big_to_read_whole_is_left_to_the_scan(tmp_path: Path) -> None:
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "cgroup.procs").write_text("1\n")
    for i in range(100):
        (wide / f"c{i}").mkdir()
        (wide / f"c{i}" / "cgroup.procs").write_text(f"{1000 + i}\n")
    assert locate.pids_under(str(wide)) is None
    deep = tmp_path / "deep"
    (deep / "a" / "b" / "c" / "d").mkdir(parents=True)
    for d in (deep, deep / "a", deep / "a" / "b", deep / "a" / "b" / "c", deep / "a" / "b" / "c" / "d"):
        (d / "cgroup.procs").write_text("9\n")
    assert locate.pids_under(str(deep)) is None
    long = tmp_path / "long"
    long.mkdir()
    (long / "cgroup.procs").write_text("1234567\n" * 40_000)
    assert locate.pids_under(str(long)) is None


# -- candidates from the pod's cgroup, verified against each process's own /proc entry -----------


@dataclass
class FakeProc:
    """A /proc-like tree: ``ns/net`` is a plain file whose inode stands for the namespace."""

    root: Path

    def process(self, pid: int, cgroup: str, netns: str, start: int) -> None:
        d = self.root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        (d / "stat").write_text(f"{pid} (x) S " + " ".join(["0"] * 18) + f" {start} 0\n")
        shared = self.root / "namespaces" / netns
        shared.parent.mkdir(exist_ok=True)
        shared.touch()
        os.link(shared, d / "ns" / "net")


def test_candidates_come_from_the_pods_cgroup_without_a_scan(
    tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.process(1, "0::/\n", "host", 1)
    proc.process(101, REAL_BESTEFFORT.text, "pod", 50)
    proc.process(102, REAL_BESTEFFORT.text, "pod", 60)
    proc.process(103, REAL_GUARANTEED.text, "reused", 10)  # PID reused by another pod's process
    tree.pod(_pod_dir(REAL_BESTEFFORT), {"pause": [101], "app": [102, 103]})
    routes = locate.CgroupRoutes(str(tree.mountinfo))
    routes.learn(REAL_BESTEFFORT.text, REAL_BESTEFFORT.uid)

    def no_scan(proc_root: str) -> list[int]:
        raise AssertionError("scanned every process")

    monkeypatch.setattr(locate, "_all_pids", no_scan)
    found, in_host = locate.pod_candidates(REAL_BESTEFFORT.uid, str(proc.root), routes=routes)
    assert [(c.pid, c.start_ticks) for c in found] == [(101, 50)]
    assert in_host == 0


def test_the_scan_decides_when_a_container_fills_the_pods_cgroup_with_sub_cgroups(
    tree: Tree, tmp_path: Path
) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.process(1, "0::/\n", "host", 1)
    proc.process(101, REAL_BESTEFFORT.text, "pod", 50)  # the pause
    proc.process(102, REAL_BESTEFFORT.text, "own", 60)  # a container in a namespace of its own
    tree.pod(_pod_dir(REAL_BESTEFFORT), {"app": [102]})  # the pause is not listed under the pod
    app = tree.base / _pod_dir(REAL_BESTEFFORT).lstrip("/") / "app"
    for i in range(100):
        (app / f"x{i}").mkdir()
    routes = locate.CgroupRoutes(str(tree.mountinfo))
    routes.learn(REAL_BESTEFFORT.text, REAL_BESTEFFORT.uid)
    assert routes.pids(REAL_BESTEFFORT.uid) is None
    found, _ = locate.pod_candidates(REAL_BESTEFFORT.uid, str(proc.root), routes=routes)
    assert [c.pid for c in found] == [101, 102]


def test_the_scan_is_the_fallback_when_the_cgroup_holds_none_of_the_pods_processes(
    tree: Tree, tmp_path: Path
) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.process(1, "0::/\n", "host", 1)
    proc.process(101, REAL_BESTEFFORT.text, "pod", 50)
    proc.process(103, REAL_GUARANTEED.text, "other", 10)
    tree.pod(_pod_dir(REAL_BESTEFFORT), {"pause": [103]})  # only a reused PID listed
    routes = locate.CgroupRoutes(str(tree.mountinfo))
    routes.learn(REAL_BESTEFFORT.text, REAL_BESTEFFORT.uid)
    found, _ = locate.pod_candidates(REAL_BESTEFFORT.uid, str(proc.root), routes=routes)
    assert [c.pid for c in found] == [101]


def test_a_pod_found_only_in_the_hosts_namespace_through_its_cgroup_is_reported_as_such(
    tree: Tree, tmp_path: Path
) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.process(1, "0::/\n", "host", 1)
    proc.process(101, REAL_BESTEFFORT.text, "host", 50)
    tree.pod(_pod_dir(REAL_BESTEFFORT), {"pause": [101]})
    routes = locate.CgroupRoutes(str(tree.mountinfo))
    routes.learn(REAL_BESTEFFORT.text, REAL_BESTEFFORT.uid)
    assert locate.pod_candidates(REAL_BESTEFFORT.uid, str(proc.root), routes=routes) == ([], 1)
    with pytest.raises(LocateError, match="host network namespace"):
        locate.by_pod_uid(REAL_BESTEFFORT.uid, proc_root=str(proc.root), routes=routes)
