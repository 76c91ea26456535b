#!/usr/bin/env python3
"""Benchmark: the agent against the floor, in the same run, on a real API server and real namespaces.

Two controllers take turns on the same control plane (a, b, a, b, ... so the machine's noise
falls on both alike):

* ``floor`` (``bench/floor.py``): the least any such controller does -- the same node-scoped
  watch, one status patch and one Event per pod, no node work;
* ``ours``: the real agent process (``run``); with ``--before-src`` also ``before``, the agent
  from another source tree (an exported older commit), and with ``--nft`` also ``nft``, the
  agent in its native nftables mode, in the same rotation.

Each trial gets a fresh node name, namespace and sandboxes. For each pod, as a kubelet would, the
benchmark makes a sandbox (a network namespace holding the pod IP, a process in a kubelet-style pod
cgroup) and reports the IP in the pod's status; a watch of its own sees the mark. Per controller:
creation -> initialized and sandbox ready -> initialized (p50/p95/p99/max), pods per second, CPU
per pod of the controller and every process it starts (a cpuacct cgroup made for it), the API
requests it made per pod by verb and the watch bytes per pod (the API server's own metrics), and
its RSS. ``--rss-pods`` adds one trial per controller with that many pods on its node for the RSS
figure. ``--steady 5,10,20`` adds steady arrival at those rates (pods per second) for
``--steady-seconds``, at most ``--max-pods-on-node`` pods alive (the oldest marked pods are
deleted, as pods come and go on a node). The last line is one JSON object. Run as root.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    CpuCgroup,
    MetricsScraper,
    Samples,
    Summary,
    controller_requests,
    cpu_seconds,
    delta,
    env_with_source,
    load,
    median,
    memory_mb,
    spawn_in,
    stop,
    watch_bytes,
    watch_events,
)
from ipnc_dev.cgroups import KubeletCgroups
from ipnc_dev.controlplane import ControlPlane, free_port
from ipnc_dev.netlab import Netlab, Process
from istio_pod_network_controller import names
from istio_pod_network_controller.cluster.api import Api

CLI = Path(sys.executable).with_name("istio-pod-network-controller")
FLOOR = Path(__file__).with_name("floor.py")
SIDECAR_ARGS = [
    "istio-iptables",
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
]
TRIAL_TIMEOUT = 600.0


def pod_body(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {names.OPT_IN: "true"}},
        "spec": {
            "nodeName": node,
            "initContainers": [{"name": "istio-init", "image": "proxyv2", "args": SIDECAR_ARGS}],
            "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}],
        },
    }


def pod_address(i: int) -> str:
    return f"10.{200 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


@dataclass(frozen=True)
class Variant:
    name: str  # floor | ours | before | nft
    src: str | None = None  # another source tree for the agent (``before``)
    extra: tuple[str, ...] = ()  # more flags for the agent (``nft``: its native nftables mode)

    def argv(self, kubeconfig: Path, node: str, port: int, workers: int) -> list[str]:
        if self.name == "floor":
            return [
                sys.executable,
                str(FLOOR),
                f"--kubeconfig={kubeconfig}",
                f"--node-name={node}",
                f"--workers={workers}",
            ]
        return [
            str(CLI),
            "run",
            f"--kubeconfig={kubeconfig}",
            f"--node-name={node}",
            f"--listen-address=127.0.0.1:{port}",
            f"--workers={workers}",
            "--log-level=warning",
            *self.extra,
        ]


@dataclass
class Trial:
    variant: str
    pods: int
    mode: str  # "burst" or "steady R/s"
    to_init: list[float] = field(default_factory=list)  # ms
    from_sandbox: list[float] = field(default_factory=list)  # ms
    seconds: float = 0.0
    cpu_all_s: float = 0.0  # the controller's cgroup: it and every child
    cpu_own_s: float = 0.0  # the controller process alone
    apiserver_cpu_s: float = 0.0
    etcd_cpu_s: float = 0.0
    requests: dict[str, float] = field(default_factory=dict)
    watch_bytes: float = 0.0  # the controller's pod watch (all pod watch bytes minus the benchmark's)
    watch_events: float = 0.0
    rss_mb: float = 0.0
    hwm_mb: float = 0.0
    load: str = ""

    @property
    def pods_per_s(self) -> float:
        return self.pods / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        reqs = ", ".join(f"{k} {v / self.pods:.2f}" for k, v in sorted(self.requests.items()))
        return (
            f"  {self.variant:6} {self.mode}, {self.pods} pods: creation->init "
            f"{Summary.of(self.to_init).text()}; sandbox->init p50 {median(self.from_sandbox):.0f} ms; "
            f"{self.pods_per_s:.1f} pods/s; CPU/pod {1000 * self.cpu_all_s / self.pods:.1f} ms "
            f"(process {1000 * self.cpu_own_s / self.pods:.1f}); API/pod: {reqs or 'none'}; "
            f"watch {self.watch_bytes / self.pods:.0f} B/pod; RSS {self.rss_mb:.1f} MB "
            f"(peak {self.hwm_mb:.1f}); apiserver CPU/pod {1000 * self.apiserver_cpu_s / self.pods:.1f} ms"
            f"  [{self.load}]"
        )


class Controller:
    """One controller process in a cpuacct cgroup of its own."""

    def __init__(self, variant: Variant, kubeconfig: Path, node: str, workers: int) -> None:
        self.variant = variant
        self.cgroup = CpuCgroup()
        self.port = free_port()
        argv = variant.argv(kubeconfig, node, self.port, workers)
        pipe = subprocess.PIPE if variant.name == "floor" else None
        self.proc = spawn_in(self.cgroup, argv, env_with_source(variant.src), stdout=pipe)

    def wait_ready(self, timeout: float = 60) -> None:
        if self.variant.name == "floor":
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # "ready", or "" when it died
            if line.strip() != b"ready":
                raise RuntimeError(f"floor did not start (exit {self.proc.poll()})")
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("agent did not become ready")

    def close(self) -> None:
        stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.cgroup.close()


class Bench:
    def __init__(self, cp: ControlPlane, workers: int) -> None:
        self.cp = cp
        self.workers = workers
        self.scraper = MetricsScraper(cp.server, cp.ssl_context())
        self.counter = itertools.count()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox")
        self.cgroup_lock = threading.Lock()

    def _cp_cpu(self) -> tuple[float, float]:
        etcd, apiserver = self.cp.pids
        return cpu_seconds(apiserver), cpu_seconds(etcd)

    async def _settle(self, before: Samples, limit: float = 10.0) -> Samples:
        """The window's metrics once the controller's requests stop growing: its Events are
        written in the background, after the mark (two scrapes 0.5 s apart that agree)."""
        loop = asyncio.get_running_loop()
        last = delta(await loop.run_in_executor(None, self.scraper.scrape), before)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            now = delta(await loop.run_in_executor(None, self.scraper.scrape), before)
            if controller_requests(now) == controller_requests(last):
                return now
            last = now
        return last

    async def trial(
        self, variant: Variant, count: int, rate: float | None = None, keep: int | None = None
    ) -> Trial:
        """One controller, ``count`` pods: at once (``rate`` None) or ``rate`` per second."""
        k = next(self.counter)
        node, ns = f"bench-node-{k}", f"bench-{k}"
        loop = asyncio.get_running_loop()
        api = Api.from_kubeconfig(str(self.cp.kubeconfig_path), timeout=60)
        await api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        mode = "burst" if rate is None else f"steady {rate:g}/s"
        trial = Trial(variant.name, count, mode)
        with Netlab() as lab, KubeletCgroups() as cgroups:
            paths = list(
                await asyncio.gather(
                    *(
                        loop.run_in_executor(self.pool, lab.add_isolated, f"p{i}", pod_address(i) + "/32")
                        for i in range(count)
                    )
                )
            )
            sleepers: dict[int, Process] = {}
            if rate is None:  # a burst: the sandboxes' processes exist before (the kubelet was faster)
                for i, proc in enumerate(
                    await asyncio.gather(*(loop.run_in_executor(self.pool, lab.sleeper, p) for p in paths))
                ):
                    sleepers[i] = proc
            controller = Controller(variant, self.cp.kubeconfig_path, node, self.workers)
            try:
                await loop.run_in_executor(None, controller.wait_ready)
                await self._drive(api, trial, lab, cgroups, controller, ns, node, paths, sleepers, rate, keep)
            finally:
                await loop.run_in_executor(None, controller.close)
                # Without a kubelet or garbage collector, pods bound to a node go at once with
                # grace 0; the next trial's controller watches another node anyway.
                await api.client.delete(f"/api/v1/namespaces/{ns}/pods", params={"gracePeriodSeconds": "0"})
                await api.close()
        return trial

    async def _drive(
        self,
        api: Api,
        trial: Trial,
        lab: Netlab,
        cgroups: KubeletCgroups,
        controller: Controller,
        ns: str,
        node: str,
        paths: list[str],
        sleepers: dict[int, Process],
        rate: float | None,
        keep: int | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        count = trial.pods
        created: dict[str, float] = {}
        sandboxed: dict[str, float] = {}
        initialized: dict[str, float] = {}
        done = asyncio.Event()
        bench_watch_bytes = 0
        live: deque[int] = deque()
        deleting: set[asyncio.Task[None]] = set()

        def remove_sandbox(i: int) -> None:
            proc = sleepers.pop(i, None)
            if proc is not None:
                proc.stop()
            lab.remove_netns(paths[i])

        async def delete_pod(i: int) -> None:
            await api.client.delete(
                f"/api/v1/namespaces/{ns}/pods/pod-{i}", params={"gracePeriodSeconds": "0"}
            )
            await loop.run_in_executor(self.pool, remove_sandbox, i)

        def seen(event: dict[str, Any]) -> None:
            pod = event.get("object") or {}
            meta = pod.get("metadata") or {}
            status = (meta.get("annotations") or {}).get(names.STATUS)
            name = meta.get("name", "")
            if event.get("type") == "DELETED" or status != names.STATUS_INITIALIZED or name in initialized:
                return
            initialized[name] = time.monotonic()
            if keep is not None:
                live.append(int(name.split("-")[1]))
                while len(live) > keep:
                    task = asyncio.create_task(delete_pod(live.popleft()))
                    deleting.add(task)
                    task.add_done_callback(deleting.discard)
            if len(initialized) == count:
                done.set()

        async def watch() -> None:
            """List, then watch from there; a stream that ends or breaks is listed and watched
            again (said on stderr), so a pod is never waited for that is already marked."""
            nonlocal bench_watch_bytes
            path = f"/api/v1/namespaces/{ns}/pods"
            for attempt in range(1000):
                if attempt:
                    await asyncio.sleep(0.2)
                try:
                    body = await api.get(path)
                    for item in body.get("items") or []:
                        seen({"type": "ADDED", "object": item})
                    params = {"watch": "1", "resourceVersion": body["metadata"]["resourceVersion"]}
                    async with api.client.stream("GET", path, params=params, timeout=None) as response:
                        buffer = b""
                        async for chunk in response.aiter_bytes():
                            bench_watch_bytes += len(chunk)
                            buffer += chunk
                            *lines, buffer = buffer.split(b"\n")
                            for line in lines:
                                if line.strip():
                                    seen(json.loads(line))
                    print(
                        f"  (benchmark's watch ended with HTTP {response.status_code}: listing again)",
                        file=sys.stderr,
                        flush=True,
                    )
                except Exception as exc:  # any break: list and watch again
                    print(f"  (benchmark's watch broke: {exc!r}: listing again)", file=sys.stderr, flush=True)

        def make_sandbox(i: int, uid: str) -> None:
            if i not in sleepers:
                sleepers[i] = lab.sleeper(paths[i])
            with self.cgroup_lock:  # place() makes the parent folders: one thread at a time
                cgroups.place(sleepers[i].pid, uid=uid, container="pause")

        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            name = f"pod-{i}"
            created[name] = time.monotonic()
            pod = await api.create(f"/api/v1/namespaces/{ns}/pods", pod_body(name, node))
            await loop.run_in_executor(self.pool, make_sandbox, i, pod["metadata"]["uid"])
            ip = pod_address(i)
            status = {
                "status": {"phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1"}
            }
            sandboxed[name] = time.monotonic()
            await api.client.patch(
                f"/api/v1/namespaces/{ns}/pods/{name}/status",
                content=json.dumps(status),
                headers={"Content-Type": "application/merge-patch+json"},
            )

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        metrics_before = await loop.run_in_executor(None, self.scraper.scrape)
        cpu_all, cpu_own = controller.cgroup.usage_seconds(), cpu_seconds(controller.proc.pid)
        api_cpu, etcd_cpu = self._cp_cpu()
        watched_before = bench_watch_bytes
        started = time.monotonic()
        schedule = [started + (i / rate if rate else 0.0) for i in range(count)]
        try:
            await asyncio.gather(*(one(i, at) for i, at in enumerate(schedule)))
            try:
                await asyncio.wait_for(done.wait(), timeout=TRIAL_TIMEOUT)
            except TimeoutError:
                print(
                    f"  ({count - len(initialized)} of {count} pods not seen marked within "
                    f"{TRIAL_TIMEOUT:.0f} s: left out of the figures)",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            finished = time.monotonic()
            for task in list(deleting):
                task.cancel()
            metrics = await self._settle(metrics_before)
            trial.cpu_all_s = controller.cgroup.usage_seconds() - cpu_all
            if controller.proc.poll() is None:
                trial.cpu_own_s = cpu_seconds(controller.proc.pid) - cpu_own
                trial.rss_mb, trial.hwm_mb = memory_mb(controller.proc.pid)
            api_after, etcd_after = self._cp_cpu()
            trial.apiserver_cpu_s, trial.etcd_cpu_s = api_after - api_cpu, etcd_after - etcd_cpu
            ours_bytes = bench_watch_bytes - watched_before
            watcher.cancel()
            trial.load = load()
        trial.seconds = finished - started
        trial.requests = controller_requests(metrics)
        # The benchmark's own watch sees the same pods' events as the controller's.
        trial.watch_bytes = max(0.0, watch_bytes(metrics) - ours_bytes)
        trial.watch_events = watch_events(metrics) / 2
        trial.to_init = [(initialized[n] - created[n]) * 1000 for n in created if n in initialized]
        trial.from_sandbox = [(initialized[n] - sandboxed[n]) * 1000 for n in sandboxed if n in initialized]


def pooled(trials: Sequence[Trial]) -> dict[str, Any]:
    to_init = [s for t in trials for s in t.to_init]
    from_sandbox = [s for t in trials for s in t.from_sandbox]
    pods = sum(t.pods for t in trials)
    requests: dict[str, float] = {}
    for t in trials:
        for k, v in t.requests.items():
            requests[k] = requests.get(k, 0.0) + v
    a, s = Summary.of(to_init), Summary.of(from_sandbox)
    return {
        "p50_ms": round(a.p50, 1),
        "p95_ms": round(a.p95, 1),
        "p99_ms": round(a.p99, 1),
        "max_ms": round(a.max, 1),
        "sandbox_p50_ms": round(s.p50, 1),
        "sandbox_p99_ms": round(s.p99, 1),
        "pods_per_s": round(median(t.pods_per_s for t in trials), 1),
        "cpu_ms_per_pod": round(1000 * sum(t.cpu_all_s for t in trials) / pods, 2),
        "process_cpu_ms_per_pod": round(1000 * sum(t.cpu_own_s for t in trials) / pods, 2),
        "api_requests_per_pod": round(sum(requests.values()) / pods, 3),
        "api_requests_per_pod_by_verb": {k: round(v / pods, 3) for k, v in sorted(requests.items())},
        "watch_bytes_per_pod": round(sum(t.watch_bytes for t in trials) / pods),
        "apiserver_cpu_ms_per_pod": round(1000 * sum(t.apiserver_cpu_s for t in trials) / pods, 2),
        "etcd_cpu_ms_per_pod": round(1000 * sum(t.etcd_cpu_s for t in trials) / pods, 2),
        "rss_mb": round(max(t.rss_mb for t in trials), 1),
    }


def report(label: str, by_variant: dict[str, list[Trial]]) -> dict[str, Any]:
    print(f"{label}:")
    out: dict[str, Any] = {}
    for name, trials in by_variant.items():
        p = pooled(trials)
        print(
            f"  {name:6} pooled: creation->init p50 {p['p50_ms']:.0f} / p95 {p['p95_ms']:.0f} / "
            f"p99 {p['p99_ms']:.0f} / max {p['max_ms']:.0f} ms; "
            f"sandbox->init p50 {p['sandbox_p50_ms']:.0f} / "
            f"p99 {p['sandbox_p99_ms']:.0f} ms; {p['pods_per_s']} pods/s (median of runs); "
            f"CPU/pod {p['cpu_ms_per_pod']} ms all in ({p['process_cpu_ms_per_pod']} the process); "
            f"API/pod {p['api_requests_per_pod']} {p['api_requests_per_pod_by_verb']}; "
            f"watch {p['watch_bytes_per_pod']} B/pod; apiserver CPU/pod {p['apiserver_cpu_ms_per_pod']} ms; "
            f"RSS {p['rss_mb']} MB"
        )
        out[name] = p
    if "floor" in out:
        for name in out:
            if name != "floor" and out["floor"]["p50_ms"] and out["floor"]["pods_per_s"]:
                print(
                    f"  {name} / floor: p50 {out[name]['p50_ms'] / out['floor']['p50_ms']:.2f}x, "
                    f"throughput {out[name]['pods_per_s'] / out['floor']['pods_per_s']:.2f}x"
                )
    return out


async def run(cp: ControlPlane, args: argparse.Namespace, variants: list[Variant]) -> dict[str, Any]:
    bench = Bench(cp, args.workers)
    result: dict[str, Any] = {
        "pods": args.pods,
        "repeats": args.repeats,
        "workers": args.workers,
        "load_start": load(),
    }
    what = [f"{args.pods}-pod bursts x {args.repeats}"] if args.pods else []
    what += [f"{args.rss_pods} pods for RSS"] if args.rss_pods else []
    rate_list = ",".join(f"{r:g}" for r in args.steady)
    what += [f"steady {rate_list}/s for {args.steady_seconds:g} s"] if args.steady else []
    print(
        f"agent vs floor: {'; '.join(what)}; {args.workers} workers; controllers "
        f"{[v.name for v in variants]}  [{load()}]",
        flush=True,
    )
    if args.pods:
        bursts: dict[str, list[Trial]] = {v.name: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                trial = await bench.trial(v, args.pods)
                bursts[v.name].append(trial)
                print(trial.line(), flush=True)
        result["burst"] = report(f"{args.pods}-pod bursts, pooled over {args.repeats} runs", bursts)
    if args.rss_pods:
        rss: dict[str, list[Trial]] = {}
        for v in variants:
            trial = await bench.trial(v, args.rss_pods)
            rss[v.name] = [trial]
            print(trial.line(), flush=True)
        result["rss"] = {
            k: {"pods": args.rss_pods, "rss_mb": round(t[0].rss_mb, 1), "peak_mb": round(t[0].hwm_mb, 1)}
            for k, t in rss.items()
        }
        print(f"RSS with {args.rss_pods} pods on the node: {result['rss']}")
    for rate in args.steady:
        count = max(1, round(rate * args.steady_seconds))
        steady: dict[str, list[Trial]] = {v.name: [] for v in variants}
        for v in variants:
            trial = await bench.trial(v, count, rate=rate, keep=args.max_pods_on_node)
            steady[v.name].append(trial)
            print(trial.line(), flush=True)
        result[f"steady_{rate:g}"] = report(f"steady {rate:g} pods/s for {args.steady_seconds:g} s", steady)
    result["load_end"] = load()
    return result


def flat(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures first, as the issue names them, then everything."""
    out: dict[str, Any] = {}
    burst = result.get("burst", {})
    for name, figures in burst.items():
        for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "pods_per_s"):
            out[f"{name}_{key}"] = figures[key]
    if "ours" in burst:
        out["cpu_ms_per_pod"] = burst["ours"]["cpu_ms_per_pod"]
        out["api_requests_per_pod"] = burst["ours"]["api_requests_per_pod"]
        out["watch_bytes_per_pod"] = burst["ours"]["watch_bytes_per_pod"]
    if "floor" in burst:
        out["floor_cpu_ms_per_pod"] = burst["floor"]["cpu_ms_per_pod"]
        out["floor_api_requests_per_pod"] = burst["floor"]["api_requests_per_pod"]
    if "ours" in result.get("rss", {}):
        out["ours_rss_mb"] = result["rss"]["ours"]["rss_mb"]
    for key, value in result.items():
        if key.startswith("steady_"):
            for name, figures in value.items():
                out[f"{key}_{name}_sandbox_p50_ms"] = figures["sandbox_p50_ms"]
                out[f"{key}_{name}_sandbox_p99_ms"] = figures["sandbox_p99_ms"]
    return {**out, "detail": result}


def rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("rates must be positive")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200, help="pods per burst (0: no bursts)")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per controller, interleaved")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--before-src", help="a src folder with an older agent, run as 'before'")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--nft", action="store_true", help="also the agent in native nftables mode, as 'nft'")
    parser.add_argument(
        "--rss-pods", type=int, default=0, help="one more trial per controller with this many pods"
    )
    parser.add_argument("--steady", type=rates, default=[], help="steady arrival rates, e.g. 5,10,20")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--max-pods-on-node", type=int, default=110)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/agent.py needs root (network namespaces, cgroups, iptables)")
    if args.pods < 0 or args.repeats < 1 or args.workers < 1 or args.pods > 60000:
        sys.exit("--pods must be 0..60000, --repeats and --workers at least 1")
    if args.before_src and not Path(args.before_src, "istio_pod_network_controller").is_dir():
        sys.exit(f"--before-src {args.before_src}: no istio_pod_network_controller package there")
    variants = [] if args.no_floor else [Variant("floor")]
    if args.before_src:
        variants.append(Variant("before", str(Path(args.before_src).resolve())))
    variants.append(Variant("ours"))
    if args.nft:
        variants.append(Variant("nft", extra=("--native-nftables",)))
    with ControlPlane.start() as cp:
        result = asyncio.run(run(cp, args, variants))
    print(json.dumps(flat(result), sort_keys=False))


if __name__ == "__main__":
    main()
