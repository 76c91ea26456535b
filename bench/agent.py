#!/usr/bin/env python3
"""Benchmark: the agent under a burst of pods, against a real API server and real namespaces.

Starts a control plane and the agent (``run``, a separate process so its RSS and CPU are its
own), then creates N opted-in pods bound to the node in a burst. For each pod, as a kubelet
would, it makes a sandbox (a network namespace on a bridge, a process in a kubelet-style pod
cgroup) and reports the pod IP in the pod's status. It prints, from a watch of its own:
time from pod creation to ``initialized`` and from sandbox ready to ``initialized`` (p50, p95,
p99), pods per second, and the agent's peak RSS and CPU seconds. Run as root.
Goals (2 cores): creation->initialized p50 < 100 ms, p99 < 500 ms; RSS < 80 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ipnc_dev.cgroups import KubeletCgroups
from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.netlab import Netlab
from istio_pod_network_controller import names
from istio_pod_network_controller.cluster.api import Api

NODE = "node-1"
CLI = Path(sys.executable).with_name("istio-pod-network-controller")
SIDECAR_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip


def pod_body(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"bench-{i}", "annotations": {names.OPT_IN: "true"}},
        "spec": {
            "nodeName": NODE,
            "initContainers": [{"name": "istio-init", "image": "proxyv2", "args": SIDECAR_ARGS}],
            "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}],
        },
    }


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def proc_usage(pid: int) -> tuple[float, float]:
    """Peak RSS (MB) and CPU seconds (user + system) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / ticks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("agent did not become ready")


async def run(cp: ControlPlane, lab: Netlab, cgroups: KubeletCgroups, count: int, workers: int) -> None:
    api = Api.from_kubeconfig(str(cp.kubeconfig_path))
    ns = "bench"
    await api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
    port = free_port()
    agent = subprocess.Popen(  # noqa: S603
        [str(CLI), "run", f"--kubeconfig={cp.kubeconfig_path}", f"--node-name={NODE}",
         f"--listen-address=127.0.0.1:{port}", f"--workers={workers}", "--log-level=warning"],
    )  # fmt: skip
    try:
        await asyncio.get_running_loop().run_in_executor(None, wait_ready, port)
        created: dict[str, float] = {}
        sandboxed: dict[str, float] = {}
        initialized: dict[str, float] = {}
        done = asyncio.Event()

        async def watch() -> None:
            body = await api.get(f"/api/v1/namespaces/{ns}/pods")
            params = {"watch": "1", "resourceVersion": body["metadata"]["resourceVersion"]}
            async for event in api.watch(f"/api/v1/namespaces/{ns}/pods", params, idle_timeout=120):
                pod = event["object"]
                status = (pod["metadata"].get("annotations") or {}).get(names.STATUS)
                name = pod["metadata"]["name"]
                if status == names.STATUS_INITIALIZED and name not in initialized:
                    initialized[name] = time.monotonic()
                    if len(initialized) == count:
                        done.set()
                        return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        pool = ThreadPoolExecutor(max_workers=1)
        loop = asyncio.get_running_loop()

        # Sandboxes are made before the burst (a namespace on the bridge and its pause process), and
        # joined to their pod's cgroup when the pod is created: the agent sees what it would see
        # on a node once the kubelet has the sandbox up, and the benchmark measures the agent and
        # the API server rather than how fast this script runs `ip`.
        sandboxes = []
        for i in range(count):
            pod = lab.add_pod(f"b{i}", ipv6=False)
            sandboxes.append((pod.ipv4, lab.sleeper(pod.path).pid))

        def make_sandbox(i: int, uid: str) -> str:
            ip, pid = sandboxes[i]
            cgroups.place(pid, uid=uid, container="pause")
            return ip

        async def one(i: int) -> None:
            name = f"bench-{i}"
            created[name] = time.monotonic()
            pod = await api.create(f"/api/v1/namespaces/{ns}/pods", pod_body(i))
            ip = await loop.run_in_executor(pool, make_sandbox, i, pod["metadata"]["uid"])
            sandboxed[name] = time.monotonic()
            status = {
                "status": {"phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1"}
            }
            await api.client.patch(
                f"/api/v1/namespaces/{ns}/pods/{name}/status",
                content=json.dumps(status),
                headers={"Content-Type": "application/merge-patch+json"},
            )

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(count)))
        await asyncio.wait_for(done.wait(), timeout=300)
        finished = time.monotonic()
        watcher.cancel()
        rss, cpu = proc_usage(agent.pid)

        to_init = [(initialized[n] - created[n]) * 1000 for n in created]
        from_sandbox = [(initialized[n] - sandboxed[n]) * 1000 for n in created]
        print(f"agent benchmark: {count} pods in a burst, {workers} workers, backend from the node")
        for label, samples in (
            ("creation -> initialized", to_init),
            ("sandbox ready -> initialized", from_sandbox),
        ):
            p50, p95, p99 = statistics.median(samples), percentile(samples, 0.95), percentile(samples, 0.99)
            print(f"  {label}: p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms")
        print(f"  throughput: {count / (finished - started):.1f} pods/s (first creation to last initialized)")
        print(f"  agent: peak RSS {rss:.1f} MB, CPU {cpu:.2f} s")
        print("  goals: creation->initialized p50 < 100 ms, p99 < 500 ms; RSS < 80 MB")
    finally:
        agent.terminate()
        agent.wait(30)
        await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/agent.py needs root (network namespaces, cgroups, iptables)")
    with ControlPlane.start() as cp, Netlab() as lab, KubeletCgroups() as cgroups:
        asyncio.run(run(cp, lab, cgroups, args.pods, args.workers))


if __name__ == "__main__":
    main()
