"""One tenant cannot stall the agent for the node.

The attack that did it: pods whose istio-iptables arguments are the normal ones plus `-d 1`
repeated 28,000 times (252 KB, under the API server's annotation limit), created and patched
again and again. Now such pods are refused in linear time with InvalidConfiguration naming the
limit, parsing runs off the event loop, and a programmed pod's rules belong to its sandbox (a
patch does not make the agent parse anything again). A normal pod created during the attack is
programmed with little extra delay; the test prints both delays (no timing asserts: a shared
machine), and fails only if the normal pod is not programmed at all within the bound.
"""

# ruff: noqa: F811 -- pytest fixtures imported from test_agent are parameters here
from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_agent import (  # noqa: F401 -- fixtures shared with the agent's other tests
    ISTIO_INIT_ARGS,
    Cluster,
    agent,
    agent_kubeconfig,
    cluster,
    detail,
    lab,
    meshed_pod,
    status,
    wait_for,
)

from ipnc_dev.agentproc import AgentProcess
from istio_pod_network_controller import names
from istio_pod_network_controller.node import tables
from istio_pod_network_controller.spec.limits import MAX_ARGS

pytestmark = pytest.mark.cluster

HOSTILE_ARGS = json.dumps(ISTIO_INIT_ARGS + ["-d", "1"] * 28_000, separators=(",", ":"))  # 252 KB


def hostile_pod(name: str, node: str) -> dict[str, Any]:
    body = meshed_pod(name, node, annotations={names.IPTABLES_ARGS: HOSTILE_ARGS})
    del body["spec"]["initContainers"]  # as the webhook leaves a pod: istio-init's args in the annotation
    return body


def time_to_initialized(cluster: Cluster, name: str) -> float:
    started = time.monotonic()
    cluster.create(meshed_pod(name, cluster.node))
    wait_for(f"{name} initialized", lambda: cluster.initialized([name]), timeout=60, every=0.02)
    return time.monotonic() - started


def owned_rules(cluster: Cluster, name: str) -> tables.Owned:
    return tables.owned(tables.parse_save(cluster.boxes.iptables_save(cluster.get(name)["metadata"]["uid"])))


def test_hostile_arguments_do_not_stall_the_agent(
    cluster: Cluster, agent: AgentProcess, tmp_path: Path
) -> None:
    patch_file = tmp_path / "patch.json"
    assert len(HOSTILE_ARGS) > 250_000
    baseline = [time_to_initialized(cluster, f"calm-{i}") for i in range(3)]

    programmed = [f"victim-{i}" for i in range(3)]
    for name in programmed:
        cluster.create(meshed_pod(name, cluster.node))
    wait_for("the tenant's own pods programmed", lambda: cluster.initialized(programmed))
    rules_before = {n: owned_rules(cluster, n) for n in programmed}

    stop = threading.Event()
    patches = [0]

    def tenant() -> None:  # the whole attack, bounded in count and time
        for i in range(3):
            cluster.create(hostile_pod(f"hostile-{i}", cluster.node))
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and patches[0] < 200:
            for name in programmed:
                changed = {names.IPTABLES_ARGS: HOSTILE_ARGS, "n": str(patches[0])}
                patch_file.write_text(json.dumps({"metadata": {"annotations": changed}}))
                done = cluster.cp.kubectl("patch", "pod", name, "-n", cluster.ns, "--type=merge",
                                          f"--patch-file={patch_file}", check=False)  # fmt: skip
                assert done.returncode == 0, done.stderr
                patches[0] += 1

    attacker = threading.Thread(target=tenant)
    attacker.start()
    try:
        time.sleep(1.0)
        during = [time_to_initialized(cluster, f"during-{i}") for i in range(3)]
    finally:
        stop.set()
        attacker.join(90)
    quiet, attacked = statistics.median(baseline), statistics.median(during)
    print(f"creation -> initialized: quiet median {quiet:.3f} s, under attack median {attacked:.3f} s "
          f"({patches[0]} hostile patches)")  # fmt: skip

    for i in range(3):
        name = f"hostile-{i}"
        wait_for(f"{name} refused", lambda n=name: status(cluster.get(n)) == names.STATUS_ERROR)  # type: ignore[misc]
        info = detail(cluster.get(name))
        assert info["reason"] == "InvalidConfiguration", info
        assert names.IPTABLES_ARGS in info["error"] and f"limit of {MAX_ARGS}" in info["error"], info
    for name in programmed:  # their sandboxes keep the rules they were programmed with
        assert status(cluster.get(name)) == names.STATUS_INITIALIZED
        assert owned_rules(cluster, name).same_rules(rules_before[name])
    assert agent.get("/healthz")[0] == 200
