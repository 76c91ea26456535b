"""The namespace locator on two real nodes, from inside a pod placed as the agent is.

Each node has its own nested cgroupRoot (``/ipnc-rn-<run>-node-<i>``), the cgroupfs driver and
cgroup v1. On each, pods of the three QoS classes, then a probe pod as privileged and with
``hostPID`` as the chart's agent, running the working tree's locator (mounted from the host)
against those pods' UIDs and IPs: once with only the host's /proc mounted (the chart today),
once with the host's /sys/fs/cgroup as well. The probe reports which way each pod was found.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import istio_pod_network_controller
from ipnc_dev.realnode import RealCluster, artifacts
from ipnc_dev.realnode.processes import pids_in_cgroups
from istio_pod_network_controller.node import locate

from .conftest import needs_root, timings

pytestmark = pytest.mark.realnode

SRC = Path(istio_pod_network_controller.__file__).resolve().parents[1]
QOS = {
    "besteffort": {},
    "burstable": {"requests": {"cpu": "10m"}},
    "guaranteed": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}},
}
PROBE = """
import json, os, sys
sys.path.insert(0, "/src")
from istio_pod_network_controller.node import locate
targets = json.loads(os.environ["TARGETS"])
routes, scans, out = locate.CgroupRoutes(), [], {"pods": {}}
real_scan = locate._all_pids
def counted(root):
    scans.append(root)
    return real_scan(root)
locate._all_pids = counted
for uid, ip in targets.items():
    before = len(scans)
    with locate.by_pod_uid(uid, pod_ips=[ip], proc_root="/host/proc", routes=routes) as ns:
        how = "scan" if len(scans) > before else "own cgroup"
        with locate.by_pod_uid(uid, pod_ips=[ip], proc_root="/host/proc", scan_only=True) as ref:
            out["pods"][uid] = {"how": how, "inode": ns.inode, "scan_inode": ref.inode}
out["roots"] = [[r.dir, r.systemd_stem] for r in routes.roots]
print("RESULT " + json.dumps(out))
"""


@dataclass
class Probe:
    node: str
    cgroup_root: str
    with_cgroup_mount: bool
    result: dict[str, Any]


@dataclass
class Located:
    cluster_cgroup_roots: dict[str, str]
    targets: dict[str, dict[str, str]]  # node -> uid -> pod IP
    probes: list[Probe]
    cgroup_texts: dict[str, list[str]]  # uid -> /proc/PID/cgroup of each of its processes


def _pod(name: str, spec: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def _probe_spec(
    cluster: RealCluster, node: str, targets: dict[str, str], with_cgroup: bool
) -> dict[str, Any]:
    assert cluster.images is not None
    mounts = [
        {"name": "proc", "mountPath": "/host/proc", "readOnly": True},
        {"name": "src", "mountPath": "/src", "readOnly": True},
    ]
    volumes = [
        {"name": "proc", "hostPath": {"path": "/proc", "type": "Directory"}},
        {"name": "src", "hostPath": {"path": str(SRC), "type": "Directory"}},
    ]
    if with_cgroup:
        mounts.append({"name": "cgroup", "mountPath": "/host/sys/fs/cgroup", "readOnly": True})
        volumes.append({"name": "cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}})
    security = {"privileged": True, "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False}
    return {
        "nodeName": node,
        "hostPID": True,
        "restartPolicy": "Never",
        "volumes": volumes,
        "containers": [
            {
                "name": "probe",
                "image": cluster.images.product,
                "imagePullPolicy": "Never",
                "command": ["python3", "-c", PROBE],
                "env": [{"name": "TARGETS", "value": json.dumps(targets)}],
                "securityContext": {**security, "readOnlyRootFilesystem": True},
                "volumeMounts": mounts,
            }
        ],
    }


def _finished(cluster: RealCluster, name: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phase = cluster.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}").stdout
        if phase in ("Succeeded", "Failed"):
            return phase
        time.sleep(1)
    raise AssertionError(f"probe {name} did not finish in {timeout:.0f} s")


@pytest.fixture(scope="module")
def located() -> Iterator[Located]:
    needs_root()
    t0 = time.monotonic()
    archives = (artifacts.PAUSE_ARCHIVE, artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE)
    with RealCluster(nodes=2, image_archives=archives) as cluster:
        assert cluster.images is not None
        cluster.wait_service_account("default")
        for node in cluster.nodes:
            for qos, resources in QOS.items():
                container = {
                    "name": "c", "image": cluster.images.busybox, "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"], "resources": resources,
                }
                spec = {"nodeName": node.name, "containers": [container]}
                cluster.kubectl("apply", "-f", "-", input=_pod(f"{node.name}-{qos}", spec))
        cluster.kubectl("wait", "--for=condition=Ready", "pod", "--all", "--timeout=180s", timeout=200)
        items = json.loads(cluster.kubectl("get", "pods", "-o", "json").stdout)["items"]
        targets: dict[str, dict[str, str]] = {n.name: {} for n in cluster.nodes}
        for pod in items:
            targets[pod["spec"]["nodeName"]][pod["metadata"]["uid"]] = pod["status"]["podIP"]
        texts: dict[str, list[str]] = {}
        for node in cluster.nodes:
            for pid in pids_in_cgroups(node.cgroups):
                try:
                    text = Path(f"/proc/{pid}/cgroup").read_text()
                except OSError:
                    continue
                for uid in targets[node.name]:
                    if uid in text:
                        texts.setdefault(uid, []).append(text)
        probes: list[Probe] = []
        for node in cluster.nodes:
            for with_cgroup in (False, True):
                name = f"probe-{node.name}-{'cgroup' if with_cgroup else 'proc'}"
                spec = _probe_spec(cluster, node.name, targets[node.name], with_cgroup)
                cluster.kubectl("apply", "-f", "-", input=_pod(name, spec))
                phase = _finished(cluster, name)
                logs = cluster.kubectl("logs", name, check=False).stdout
                lines = [line for line in logs.splitlines() if line.startswith("RESULT ")]
                assert phase == "Succeeded" and lines, f"{name}: {phase}\n{logs}"
                result = json.loads(lines[-1].removeprefix("RESULT "))
                probes.append(Probe(node.name, node.plan.cgroup_name, with_cgroup, result))
        yield Located({n.name: n.plan.cgroup_name for n in cluster.nodes}, targets, probes, texts)
    timings.append(f"real-node locator: {time.monotonic() - t0:.0f} s")


def test_every_process_of_every_pod_is_recognised_as_its_pods_and_no_other(located: Located) -> None:
    uids = [uid for pods in located.targets.values() for uid in pods]
    assert len(uids) == 6
    for uid in uids:
        texts = located.cgroup_texts.get(uid, [])
        assert len(texts) >= 2  # the pause and the app
        for text in texts:
            assert [other for other in uids if locate.in_pod_cgroup(text, other)] == [uid]


def test_every_pod_is_found_in_its_own_namespace_both_ways(located: Located) -> None:
    assert len(located.probes) == 4
    for probe in located.probes:
        pods = probe.result["pods"]
        assert set(pods) == set(located.targets[probe.node])
        for found in pods.values():
            assert found["inode"] == found["scan_inode"]


def test_with_the_hosts_cgroup_tree_mounted_the_next_pods_are_read_from_their_own_cgroup(
    located: Located,
) -> None:
    for probe in (p for p in located.probes if p.with_cgroup_mount):
        hows = [found["how"] for found in probe.result["pods"].values()]
        assert hows[0] == "scan" and hows[1:] == ["own cgroup", "own cgroup"], probe
        [[directory, stem]] = probe.result["roots"]
        assert stem is None  # cgroupfs
        assert directory.startswith("/host/sys/fs/cgroup/")
        assert directory.endswith(f"/{probe.cgroup_root}/kubepods")


def test_with_only_proc_mounted_as_the_chart_does_today_every_pod_is_scanned_for(
    located: Located,
) -> None:
    for probe in (p for p in located.probes if not p.with_cgroup_mount):
        assert probe.result["roots"] == []
        assert {found["how"] for found in probe.result["pods"].values()} == {"scan"}
