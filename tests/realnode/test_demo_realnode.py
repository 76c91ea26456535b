"""`demo --real-node` end to end, as a person runs it (no terminal): the demo's story on two real
nodes, exit status 0, and the host as it was before (the harness's own comparison, which the
summary reports, and an independent one around the whole command)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipnc_dev.demo import SERVICES
from ipnc_dev.realnode import hoststate
from istio_pod_network_controller import names

from .conftest import needs_root, timings

pytestmark = pytest.mark.realnode

CLI = Path(sys.executable).with_name("istio-pod-network-controller")
RUN_TIMEOUT = 600.0
REQUESTS = 2


def test_demo_on_real_nodes_tells_the_story_and_leaves_the_host_as_found(tmp_path: Path) -> None:
    needs_root()
    summary_path = tmp_path / "summary.json"
    before = hoststate.capture()
    t0 = time.monotonic()
    done = subprocess.run(  # noqa: S603 - our own CLI
        [
            str(CLI),
            "demo",
            "--real-node",
            "--plain",
            f"--requests={REQUESTS}",
            f"--json-summary={summary_path}",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
        check=False,
    )
    after = hoststate.capture()
    timings.append(f"demo --real-node: {time.monotonic() - t0:.1f} s in all")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] and summary["real_node"], summary["failure"]
    assert "on real nodes (kubelet, containerd, runc)" in done.stdout
    # Every pod admitted under restricted with the waiter instead of istio-init, programmed by the
    # agent of its own node, and running there.
    assert summary["pods_running"] == summary["pods_total"] == len(SERVICES)
    for pod in summary["pods"]:
        assert pod["mutated"] and pod["init_containers"][0] == names.WAITER_CONTAINER, pod
        assert pod["rules"] and pod["netns_inode"] and pod["running_s"] is not None, pod
        assert "outbound redirect proven" in pod["waiter_line"], pod
    assert {p["node"] for p in summary["pods"]} == {"node-1", "node-2"}
    # Every request caught by the sender's own sidecar, which logged that very connection.
    assert summary["requests_intercepted"] == summary["requests_total"] == REQUESTS * (len(SERVICES) - 1)
    assert all(h["recorded_by_sidecar"] and h["answered_by"] == "istio-proxy:15001" for h in summary["hops"])
    # The host: the harness compared it with its record (a difference would have failed the run),
    # and so does this test, around the whole command.
    assert summary["host"] == "as it was"
    assert "it is as it was" in done.stdout
    run = re.search(r"ipnc-rn-([0-9a-f]{6})$", summary["resources"]["workdir"])
    assert run, summary["resources"]
    assert before.diff(after, foreign=hoststate.foreign_to(run[1])) == []
    assert not Path(summary["resources"]["workdir"]).exists()
