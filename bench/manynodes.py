#!/usr/bin/env python3
"""Benchmark: what many nodes' agents cost one API server, per node and per pod.

One real API server; N simulated nodes in this process, each with the agent's API pattern and
its own HTTP client (so its own connections): list + watch of its node's pods (field selector
``spec.nodeName``) and of all namespaces, one status patch and one Event per pod (``bench/floor.py``'s
controller with the namespace watch on). No node work: only the API side is measured. As N grows
(the simulated nodes stay up; more join), for each N:

* start-up of the new nodes: the API server's CPU and requests per node joining;
* idle: the API server's CPU per second with N nodes watching, and the watches held;
* a wave of P pods per node (created, bound, given an IP, marked, deleted): the API server's and
  etcd's CPU per pod above a wave with no node watching (measured first, same P), the
  controllers' requests per pod by verb, pod watch events and bytes per pod;
* namespace fan-out: watch events and bytes sent per namespace created;
* with ``--restart``, every node's controller restarted while a wave's pods are in place (a
  rollout): the API server's CPU and list bytes per node.

Prints a line per step and, last, one JSON object. ``docs/comparison.md`` turns the unit costs
into a 5,000-node estimate. Needs no root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    MetricsScraper,
    Samples,
    controller_requests,
    cpu_seconds,
    delta,
    gauge,
    load,
    response_bytes,
    watch_bytes,
    watch_events,
)
from floor import Floor
from ipnc_dev.controlplane import ControlPlane
from istio_pod_network_controller import names
from istio_pod_network_controller.cluster.api import Api

INFLIGHT = 32  # the driver's concurrent API calls (pods created and given IPs)
WAIT_TIMEOUT = 600.0


def pod_body(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {names.OPT_IN: "true"}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
    }


class Sim:
    def __init__(self, cp: ControlPlane, workers: int, *, relist: bool = False) -> None:
        self.cp = cp
        self.workers = workers
        self.scraper = MetricsScraper(cp.server, cp.ssl_context())
        self.nodes: list[tuple[Api, Floor]] = []
        self.driver = Api.from_kubeconfig(str(cp.kubeconfig_path), timeout=60)
        self.waves = 0
        self.relist = relist
        self.last_restart: dict[str, Any] = {}

    def cpu(self) -> tuple[float, float]:
        etcd, apiserver = self.cp.pids
        return cpu_seconds(apiserver), cpu_seconds(etcd)

    async def scrape(self) -> Samples:
        return await asyncio.get_running_loop().run_in_executor(None, self.scraper.scrape)

    async def window(self) -> tuple[Samples, float, float, float]:
        api, etcd = self.cpu()
        return await self.scrape(), api, etcd, time.monotonic()

    async def since(self, start: tuple[Samples, float, float, float]) -> dict[str, Any]:
        samples, api0, etcd0, t0 = start
        api1, etcd1 = self.cpu()
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.3)  # the last watch events of the window
        after = await self.scrape()
        d = delta(after, samples)
        return {
            "seconds": elapsed,
            "apiserver_cpu_s": api1 - api0,
            "etcd_cpu_s": etcd1 - etcd0,
            "delta": d,
            "after": after,
        }

    async def grow(self, total: int) -> dict[str, Any]:
        """Start nodes until there are ``total``; the cost of their start-up."""
        start = await self.window()
        new = []
        for i in range(len(self.nodes), total):
            api = Api.from_kubeconfig(str(self.cp.kubeconfig_path), timeout=60)
            node = Floor(api, f"sim-node-{i}", self.workers, namespaces=True)
            new.append(node.start())
            self.nodes.append((api, node))
        await asyncio.gather(*new)
        joined = len(new)
        got = await self.since(start)
        reqs = controller_requests(got["delta"])
        return {
            "joined": joined,
            "apiserver_cpu_ms_per_node": 1000 * got["apiserver_cpu_s"] / max(1, joined),
            "requests_per_node": {k: round(v / max(1, joined), 2) for k, v in sorted(reqs.items())},
        }

    async def idle(self, seconds: float) -> dict[str, Any]:
        start = await self.window()
        await asyncio.sleep(seconds)
        got = await self.since(start)
        after = got["after"]
        return {
            "apiserver_cpu_ms_per_s": 1000 * got["apiserver_cpu_s"] / got["seconds"],
            "etcd_cpu_ms_per_s": 1000 * got["etcd_cpu_s"] / got["seconds"],
            "pod_watches": gauge(after, "apiserver_longrunning_requests", verb="WATCH", resource="pods"),
            "namespace_watches": gauge(
                after, "apiserver_longrunning_requests", verb="WATCH", resource="namespaces"
            ),
        }

    async def wave(self, per_node: int, *, nodes: int | None = None) -> dict[str, Any]:
        """``per_node`` pods on each node (or on ``nodes`` names nobody watches: the baseline)."""
        count = nodes if nodes is not None else len(self.nodes)
        ns = f"wave-{self.waves}"
        self.waves += 1
        await self.driver.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        marked_before = sum(f.marked for _, f in self.nodes)
        total = count * per_node
        limit = asyncio.Semaphore(INFLIGHT)

        async def one(i: int) -> None:
            name, node = f"p-{i}", f"{'sim' if nodes is None else 'nobody'}-node-{i % count}"
            ip = f"10.{100 + i // 65000}.{(i // 250) % 250}.{i % 250 + 1}"
            status = {"status": {"phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}]}}
            async with limit:
                await self.driver.create(f"/api/v1/namespaces/{ns}/pods", pod_body(name, node))
                await self.driver.client.patch(
                    f"/api/v1/namespaces/{ns}/pods/{name}/status",
                    content=json.dumps(status),
                    headers={"Content-Type": "application/merge-patch+json"},
                )

        start = await self.window()
        await asyncio.gather(*(one(i) for i in range(total)))
        deadline = time.monotonic() + WAIT_TIMEOUT
        while nodes is None and sum(f.marked for _, f in self.nodes) - marked_before < total:
            if time.monotonic() > deadline:
                raise RuntimeError("the simulated nodes did not mark every pod in time")
            await asyncio.sleep(0.05)
        marked_at = time.monotonic() - start[3]
        await asyncio.sleep(1.0)  # Events are written in the background
        relisted = await self.restart() if self.relist and nodes is None else None
        restart_cost = self.last_restart if relisted is not None else None
        await self.driver.client.delete(f"/api/v1/namespaces/{ns}/pods", params={"gracePeriodSeconds": "0"})
        await asyncio.sleep(1.0)  # the deletions reach the watches
        got = await self.since(start)
        d = got["delta"]
        if restart_cost is not None:  # the wave's figures are the pods' alone
            d = delta(d, restart_cost["delta"])
            got["apiserver_cpu_s"] -= restart_cost["apiserver_cpu_s"]
            got["etcd_cpu_s"] -= restart_cost["etcd_cpu_s"]
        reqs = controller_requests(d)
        return {
            "pods": total,
            "restart": relisted,
            "seconds_to_marked": round(marked_at, 2),
            "apiserver_cpu_s": got["apiserver_cpu_s"],
            "etcd_cpu_s": got["etcd_cpu_s"],
            "requests_per_pod": {k: round(v / total, 3) for k, v in sorted(reqs.items())},
            "pod_watch_events_per_pod": round(watch_events(d) / total, 2),
            "pod_watch_bytes_per_pod": round(watch_bytes(d) / total),
        }

    async def restart(self) -> dict[str, Any]:
        """Every node's controller restarted with its pods in place (a rollout of the
        DaemonSet): the API server's cost of their lists, per node. Subtracted from the wave's
        own figures, so those stay what the pods cost."""
        start = await self.window()
        old = list(self.nodes)
        await asyncio.gather(*(node.stop() for _, node in old))
        fresh = [(api, Floor(api, node.node, self.workers, namespaces=True)) for api, node in old]
        await asyncio.gather(*(node.start() for _, node in fresh))
        self.nodes = fresh
        got = await self.since(start)
        d, count = got["delta"], len(old)
        self.last_restart = got
        return {
            "apiserver_cpu_ms_per_node": round(1000 * got["apiserver_cpu_s"] / count, 2),
            "pod_list_bytes_per_node": round(response_bytes(d, "LIST", "pods") / count),
            "namespace_list_bytes_per_node": round(response_bytes(d, "LIST", "namespaces") / count),
            "requests_per_node": {k: round(v / count, 2) for k, v in sorted(controller_requests(d).items())},
        }

    async def namespaces(self, count: int) -> dict[str, Any]:
        start = await self.window()
        for i in range(count):
            await self.driver.create("/api/v1/namespaces", {"metadata": {"name": f"fanout-{self.waves}-{i}"}})
        self.waves += 1
        await asyncio.sleep(1.0)
        got = await self.since(start)
        d = got["delta"]
        return {
            "events_per_namespace": watch_events(d, "namespaces") / count,
            "bytes_per_namespace": watch_bytes(d, "namespaces") / count,
            "apiserver_cpu_ms_per_namespace": 1000 * got["apiserver_cpu_s"] / count,
        }

    async def close(self) -> None:
        for api, node in self.nodes:
            await node.stop()
            await api.close()
        await self.driver.close()


async def run(cp: ControlPlane, args: argparse.Namespace) -> dict[str, Any]:
    sim = Sim(cp, args.workers, relist=args.restart)
    out: dict[str, Any] = {"load_start": load(), "steps": []}
    print(f"many nodes: nodes {args.nodes}, pods per node {args.pods_per_node}  [{load()}]", flush=True)
    try:
        idle0 = await sim.idle(args.idle_seconds)
        print(f"  0 nodes idle: apiserver {idle0['apiserver_cpu_ms_per_s']:.1f} ms CPU/s", flush=True)
        out["idle_0"] = idle0
        baseline: dict[int, dict[str, Any]] = {}
        for per_node in args.pods_per_node:
            base = await sim.wave(per_node, nodes=max(args.nodes))
            baseline[per_node] = base
            print(
                f"  baseline wave (no node watching), {base['pods']} pods: apiserver "
                f"{1000 * base['apiserver_cpu_s'] / base['pods']:.2f} ms/pod, etcd "
                f"{1000 * base['etcd_cpu_s'] / base['pods']:.2f} ms/pod",
                flush=True,
            )
        out["baseline"] = baseline
        for total in args.nodes:
            step: dict[str, Any] = {"nodes": total}
            step["startup"] = await sim.grow(total)
            up = step["startup"]
            print(
                f"  {total} nodes: {up['joined']} joined, apiserver {up['apiserver_cpu_ms_per_node']:.1f} ms "
                f"CPU per node joining, requests per node {up['requests_per_node']}",
                flush=True,
            )
            step["idle"] = await sim.idle(args.idle_seconds)
            idle = step["idle"]
            print(
                f"    idle: apiserver {idle['apiserver_cpu_ms_per_s']:.1f} ms CPU/s "
                f"({idle['apiserver_cpu_ms_per_s'] - idle0['apiserver_cpu_ms_per_s']:+.1f} over no nodes), "
                f"watches pods {idle['pod_watches'] - idle0['pod_watches']:.0f}, "
                f"namespaces {idle['namespace_watches'] - idle0['namespace_watches']:.0f} (over no nodes)",
                flush=True,
            )
            step["waves"] = {}
            for per_node in args.pods_per_node:
                wave = await sim.wave(per_node)
                base = baseline[per_node]
                base_api, base_etcd = (
                    base["apiserver_cpu_s"] / base["pods"],
                    base["etcd_cpu_s"] / base["pods"],
                )
                wave["apiserver_cpu_ms_per_pod_above_baseline"] = round(
                    1000 * (wave["apiserver_cpu_s"] / wave["pods"] - base_api), 3
                )
                wave["etcd_cpu_ms_per_pod_above_baseline"] = round(
                    1000 * (wave["etcd_cpu_s"] / wave["pods"] - base_etcd), 3
                )
                # The API server's own pod watchers see every wave, watched or not.
                for key in ("pod_watch_events_per_pod", "pod_watch_bytes_per_pod"):
                    wave[key] = round(wave[key] - base[key], 2)
                step["waves"][per_node] = wave
                if wave["restart"]:
                    r = wave["restart"]
                    print(
                        f"    restart with {per_node} pods/node: apiserver "
                        f"{r['apiserver_cpu_ms_per_node']} ms "
                        f"per node, pod list {r['pod_list_bytes_per_node']} B, namespace list "
                        f"{r['namespace_list_bytes_per_node']} B per node; {r['requests_per_node']}",
                        flush=True,
                    )
                above_api = wave["apiserver_cpu_ms_per_pod_above_baseline"]
                above_etcd = wave["etcd_cpu_ms_per_pod_above_baseline"]
                print(
                    f"    {per_node} pods/node ({wave['pods']} pods, marked after "
                    f"{wave['seconds_to_marked']} s): apiserver +{above_api:.2f} ms/pod, etcd "
                    f"+{above_etcd:.2f} ms/pod over the baseline; requests/pod {wave['requests_per_pod']}; "
                    f"pod watch {wave['pod_watch_events_per_pod']} events, "  # above the baseline
                    f"{wave['pod_watch_bytes_per_pod']} B per pod",
                    flush=True,
                )
            step["namespace_fanout"] = await sim.namespaces(args.namespaces)
            fan = step["namespace_fanout"]
            print(
                f"    namespace created: {fan['events_per_namespace']:.1f} watch events, "
                f"{fan['bytes_per_namespace']:.0f} B, "
                f"apiserver {fan['apiserver_cpu_ms_per_namespace']:.1f} ms",
                flush=True,
            )
            step["load"] = load()
            out["steps"].append(step)
    finally:
        await sim.close()
    out["load_end"] = load()
    return out


def counts(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or values[0] < 1 or values[-1] > 1000:
        raise argparse.ArgumentTypeError("numbers must be 1..1000")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=counts, default=[10, 30, 100], help="node counts, ascending")
    parser.add_argument("--pods-per-node", type=counts, default=[2, 10], help="pods per node in a wave")
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--namespaces", type=int, default=5, help="namespaces created for the fan-out")
    parser.add_argument("--workers", type=int, default=2, help="workers per simulated node")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="restart every node's controller while each wave's pods are in place",
    )
    args = parser.parse_args()
    if args.idle_seconds <= 0 or not 1 <= args.namespaces <= 100 or args.workers < 1:
        sys.exit("--idle-seconds must be positive, --namespaces 1..100, --workers at least 1")
    with ControlPlane.start() as cp:
        result = asyncio.run(run(cp, args))
    text = json.dumps(result, default=str)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
