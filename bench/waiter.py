#!/usr/bin/env python3
"""Benchmark: pod creation to the waiter's exit, the whole path a meshed pod takes.

A real API server, the real webhook (mutating Istio-shaped pods: istio-init out, waiter in), the
node stand-in running every container as a process (waiter, stub proxy, app stub), and the agent
(``run``) programming each sandbox. N pods are created in a burst; for each, the time from
just before its create call to the moment its waiter exited 0 (its log file's last write) is
measured. Prints p50, p95, p99. Run as root. Goal (2 cores): p50 < 300 ms for 100 pods.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightkube.resources.core_v1 import Pod

from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.standin import NodeStandIn
from ipnc_dev.webhookproc import WebhookProcess
from istio_pod_network_controller import names
from istio_pod_network_controller.spec.manifest import load_pod

NODE = "node-bench"
NAMESPACE = "bench"
SHARED = Path(os.environ.get("IPNC_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def template() -> dict[str, Any]:
    """Istio's injected hello pod (istio-init, native-sidecar proxy), trimmed of the volumes a
    real cluster would provide, bound to the benchmark's node."""
    pod = load_pod(str(SHARED / "istio" / "injected" / "hello.yaml.injected"))
    spec = pod["spec"]
    spec["nodeName"] = NODE
    spec["serviceAccountName"] = "default"
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        container.setdefault("securityContext", copy.deepcopy(RESTRICTED))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"annotations": pod["metadata"]["annotations"]},
        "spec": spec,
    }


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/waiter.py needs root (network namespaces, cgroups, iptables)")
    base = template()
    with ControlPlane.start() as cp, tempfile.TemporaryDirectory(prefix="ipnc-bench-") as tmp:
        cp.kubectl("create", "namespace", NAMESPACE)
        cp.kubectl("annotate", "namespace", NAMESPACE, f"{names.OPT_IN}={names.OPT_IN_VALUE}")
        webhook = WebhookProcess(cp.kubeconfig_path, extra=["--waiter-image=istio-pod-network-controller"],
                                 folder=Path(tmp)).start()  # fmt: skip
        agent = AgentProcess(cp.kubeconfig_path, NODE, extra=("--log-level=warning",))
        try:
            config = webhook.configuration("ipnc-bench", [NAMESPACE])
            cp.kubectl("apply", "-f", "-", input=json.dumps(config))
            time.sleep(2)  # the API server picks the configuration up asynchronously
            agent.start().wait_ready()
            with NodeStandIn(NODE, cp.kubeconfig_path) as node:
                created: dict[str, float] = {}

                bodies = []
                for i in range(args.pods):
                    body = copy.deepcopy(base)
                    body["metadata"]["name"] = f"bench-{i}"
                    bodies.append(Pod.from_dict(body))
                started = time.monotonic()
                with cp.client() as client:  # one client, back to back: as fast as the API server takes them
                    for pod in bodies:
                        assert pod.metadata is not None and pod.metadata.name is not None
                        created[pod.metadata.name] = time.time()
                        client.create(pod, namespace=NAMESPACE)
                exits: dict[str, float] = {}
                deadline = time.monotonic() + 600
                while len(exits) < args.pods and time.monotonic() < deadline:
                    for name in created:
                        if name in exits:
                            continue
                        view = node.find(NAMESPACE, name)
                        if view is None or names.WAITER_CONTAINER not in view.containers:
                            continue
                        waiter = view.container(names.WAITER_CONTAINER)
                        if 0 in waiter.exit_codes:
                            run = waiter.exit_codes.index(0)
                            exits[name] = waiter.log_paths[run].stat().st_mtime
                    time.sleep(0.2)
                elapsed = time.monotonic() - started
            samples = [(exits[n] - created[n]) * 1000 for n in exits]
            missing = args.pods - len(samples)
            print(f"waiter benchmark: {args.pods} Istio-injected pods in a burst through the webhook, "
                  f"one node stand-in, one agent")  # fmt: skip
            print(f"  creation -> waiter exit 0: p50 {statistics.median(samples):.0f} ms, "
                  f"p95 {percentile(samples, 0.95):.0f} ms, p99 {percentile(samples, 0.99):.0f} ms"
                  + (f"  ({missing} pods never passed)" if missing else ""))  # fmt: skip
            print(f"  all waiters passed after {elapsed:.1f} s; goal: p50 < 300 ms")
        finally:
            agent.stop()
            agent.close()
            webhook.stop()


if __name__ == "__main__":
    main()
