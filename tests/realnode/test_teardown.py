"""A real cluster leaves the host as it found it: after a test that fails, after SIGTERM, and the
comparison that says so names what differs when something does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipnc_dev.realnode import RealCluster, artifacts, hoststate
from ipnc_dev.realnode.processes import cgroup_hierarchies

from .conftest import needs_root, timings

pytestmark = pytest.mark.realnode

START_TIMEOUT = 240.0
STOP_TIMEOUT = 90.0


class FailsOnPurpose(Exception):
    pass


def _busybox_pod(image: str) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: sleeper, namespace: default}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: sleeper
    image: {image}
    imagePullPolicy: Never
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]
"""


def test_host_is_as_found_after_a_test_that_fails_on_purpose() -> None:
    needs_root()
    before = hoststate.capture()
    cluster = RealCluster(nodes=1, image_archives=(artifacts.BUSYBOX_ARCHIVE,))
    t0 = time.monotonic()
    with pytest.raises(FailsOnPurpose), cluster:
        assert cluster.images is not None
        # Something real to undo: a running container (CNI address and chains, overlay and shm
        # mounts in the node, cgroups below the node's root, a shim).
        cluster.wait_service_account("default")
        cluster.kubectl("apply", "-f", "-", input=_busybox_pod(cluster.images.busybox))
        cluster.kubectl("wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s", timeout=150)
        running = cluster.crictl(cluster.nodes[0], "ps", "-q").stdout.split()
        assert running, "a container runs on the node"
        raise FailsOnPurpose("this test fails here, with the cluster up")
    after = hoststate.capture()
    timings.append(
        f"real-node test that fails on purpose: {time.monotonic() - t0:.1f} s for one node up, a pod "
        "running, teardown and host check"
    )
    assert cluster.differences == []
    assert before.diff(after, foreign=hoststate.foreign_to(cluster.run_id)) == []
    assert not cluster.state.exists()
    for node in cluster.nodes:
        assert not any((h / node.plan.cgroup_name).exists() for h in cgroup_hierarchies())
        assert all(p.exited() is not None for p in (node.holder, node.containerd, node.kubelet) if p)


def test_dev_cluster_real_node_stops_on_sigterm_and_leaves_the_host_as_found(tmp_path: Path) -> None:
    needs_root()
    before = hoststate.capture()
    out, err = tmp_path / "out", tmp_path / "err"
    cli = Path(sys.executable).with_name("istio-pod-network-controller")
    t0 = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(  # noqa: S603 - our own CLI
            [str(cli), "dev", "cluster", "--real-node", "--nodes", "1"],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while "Ctrl-C stops it." not in out.read_text():
                assert proc.poll() is None, f"dev cluster exited {proc.returncode}:\n{err.read_text()}"
                assert time.monotonic() < deadline, (
                    f"dev cluster not up in {START_TIMEOUT:g} s:\n{err.read_text()}"
                )
                time.sleep(0.5)
            started = time.monotonic()
            printed = out.read_text()
            kubeconfig = re.search(r"^kubeconfig: (\S+)$", printed, re.M)
            run = re.search(r"\(state /\S*ipnc-rn-([0-9a-f]{6})\)", printed)
            assert kubeconfig and run, printed
            from ipnc_dev import binaries

            nodes = subprocess.run(  # noqa: S603 - the test kubectl
                [str(binaries.find("kubectl")), f"--kubeconfig={kubeconfig[1]}", f"--cache-dir={tmp_path}/kc",
                 "get", "nodes,pods", "-A", "--no-headers"],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout  # fmt: skip
            assert re.search(r"node/node-1\s+Ready", nodes), nodes
            assert re.search(r"pod/istio-pod-network-controller-agent-\S+\s+1/1\s+Running", nodes), nodes
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(STOP_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    after = hoststate.capture()
    timings.append(
        f"dev cluster --real-node: up in {started - t0:.1f} s (one node and the chart), "
        f"down after SIGTERM in {time.monotonic() - started:.1f} s"
    )
    assert code == 0, err.read_text()
    assert "stopped; the host is as it was" in err.read_text()
    assert before.diff(after, foreign=hoststate.foreign_to(run[1])) == []


def test_ctrl_c_while_the_nodes_start_leaves_the_host_as_found(tmp_path: Path) -> None:
    needs_root()
    before = hoststate.capture()
    err = tmp_path / "err"
    cli = Path(sys.executable).with_name("istio-pod-network-controller")
    with err.open("w") as stderr:
        proc = subprocess.Popen(  # noqa: S603 - our own CLI
            [str(cli), "dev", "cluster", "--real-node", "--nodes", "2"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            # The control plane is up: the nodes' namespaces, containerd and images come next.
            while "control plane ready" not in err.read_text():
                assert proc.poll() is None, f"dev cluster exited {proc.returncode}:\n{err.read_text()}"
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.1)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(STOP_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run = re.search(r"ipnc-rn-([0-9a-f]{6})", err.read_text())
    assert run, err.read_text()
    assert code == 0, err.read_text()
    assert "stopped; the host is as it was" in err.read_text()
    assert before.diff(hoststate.capture(), foreign=hoststate.foreign_to(run[1])) == []


def test_a_difference_from_before_is_named() -> None:
    needs_root()
    run = "c0ffee"
    before = hoststate.capture()
    leftover = cgroup_hierarchies()[0] / f"ipnc-rn-{run}-node-1"
    other_run = cgroup_hierarchies()[0] / "ipnc-rn-beef00-node-1"
    leftover.mkdir()
    other_run.mkdir()
    try:
        after = hoststate.capture()
    finally:
        leftover.rmdir()
        other_run.rmdir()
    differences = before.diff(after, foreign=hoststate.foreign_to(run))
    assert differences == [f"cgroup added: {leftover.parent.name}/{leftover.name}"]
    assert hoststate.capture().diff(before, foreign=hoststate.foreign_to(run)) == []
