#!/usr/bin/env python3
"""Benchmark: pod creation to the waiter's exit, the whole path a meshed pod takes.

A real API server, the real webhook (mutating Istio-shaped pods: istio-init out, waiter in), the
node stand-in running every container as a process (waiter, stub proxy, app stub), and the agent
(``run``) programming each sandbox. N pods are created in a burst; for each, the time from
just before its create call to the moment its waiter exited 0 (its log file's last write) is
measured. Prints p50, p95, p99. Run as root. Goal (2 cores): p50 < 300 ms for 100 pods.

``--start N`` measures the waiter alone instead: N runs of ``init`` with the mark already in its
annotations file (written as the kubelet writes it, naming this process's network namespace),
from start to exit, each with its wall time and peak RSS; interleaved with the same number of
bare ``python -c pass`` runs, the interpreter's own start-up that any Python waiter pays. Needs
neither root nor a cluster. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from lightkube.resources.core_v1 import Pod

from _common import load, percentile
from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.podinfo_volume import write_podinfo
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


CLI = Path(sys.executable).with_name("istio-pod-network-controller")
TIME = "/usr/bin/time"


def timed_run(argv: list[str]) -> tuple[float, float, int]:
    """Wall milliseconds, peak RSS in MB and exit status of one child process.

    The peak RSS comes from GNU time, a small process that forks the command: the kernel counts
    the memory of the process a command was forked from into the command's peak, and this
    benchmark's own (tens of MB) would hide the waiter's. The wall time includes GNU time's own
    start, about a millisecond."""
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603
        [TIME, "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    elapsed = (time.perf_counter() - started) * 1000
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return elapsed, int(last) / 1024 if last.isdigit() else float("nan"), done.returncode


def start_to_exit(runs: int) -> None:
    """The waiter from start to exit 0 with its mark already there, against bare Python."""
    with tempfile.TemporaryDirectory(prefix="ipnc-waiter-start-") as tmp:
        inode = os.stat("/proc/self/ns/net").st_ino
        detail = {"netnsInode": inode, "rulesetSha256": "0" * 64, "mode": "iptables", "node": NODE}
        annotations = {names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: json.dumps(detail)}
        write_podinfo(tmp, annotations)
        waiter = [str(CLI), names.WAITER_SUBCOMMAND, "--file", str(Path(tmp) / names.PODINFO_ANNOTATIONS),
                  "--timeout", "10"]  # fmt: skip
        bare = [sys.executable, "-c", "pass"]
        got: dict[str, list[tuple[float, float]]] = {"waiter": [], "python -c pass": [], "/bin/true": []}
        timed_run(waiter)  # warm the page cache, as a node that runs the image often has it cached
        for _ in range(runs):
            for name, argv in (("waiter", waiter), ("python -c pass", bare), ("/bin/true", ["/bin/true"])):
                wall, rss, code = timed_run(argv)
                if code != 0:
                    sys.exit(f"{name} exited {code}: {' '.join(argv)}")
                got[name].append((wall, rss))
    print(f"waiter start -> exit with the mark present, {runs} runs each, interleaved  [{load()}]")
    result: dict[str, float] = {"runs": runs}
    for name, samples in got.items():
        walls, rsss = [w for w, _ in samples], [r for _, r in samples]
        p50, worst = statistics.median(walls), max(walls)
        print(f"  {name}: wall p50 {p50:.1f} ms, p95 {percentile(walls, 0.95):.1f} ms, max {worst:.1f} ms; "
              f"peak RSS p50 {statistics.median(rsss):.1f} MB, max {max(rsss):.1f} MB")  # fmt: skip
        key = {"waiter": "waiter", "python -c pass": "python"}.get(name, "true")
        result.update({f"{key}_wall_p50_ms": round(p50, 1), f"{key}_wall_max_ms": round(worst, 1),
                       f"{key}_rss_p50_mb": round(statistics.median(rsss), 1),
                       f"{key}_rss_max_mb": round(max(rsss), 1)})  # fmt: skip
    print("  goals: <= 20 ms wall, <= 12 MB RSS")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--start", type=int, metavar="N", help="measure N waiter start-to-exit runs instead")
    args = parser.parse_args()
    if args.start is not None:
        if not 1 <= args.start <= 10000:
            sys.exit("--start must be 1..10000")
        if not Path(TIME).exists():
            sys.exit(f"--start needs GNU time at {TIME}")
        start_to_exit(args.start)
        return
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
                    bodies.append(cast(Pod, Pod.from_dict(body)))
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
