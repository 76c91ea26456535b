#!/usr/bin/env python3
"""The floor: the least any node-scoped pod controller must do, as a process of its own.

It watches the pods of one node (list + watch with the same field selector as the agent, through
the same client), and for each opted-in pod that has its IPs and no mark yet it writes one
status patch of the agent's shape and size and queues one Event: no namespace lookup, no rules,
no node work at all. ``bench/agent.py`` runs it beside the real agent in the same benchmark, so
what the agent costs above this line is its own work, whatever the machine's load.
Prints ``ready`` on stdout once its first list is in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from istio_pod_network_controller import names
from istio_pod_network_controller.cluster.api import Api
from istio_pod_network_controller.cluster.reflector import Reflector, cancel_all, name_key, uid_key
from istio_pod_network_controller.cluster.report import (
    EventRecorder,
    PodGone,
    PodRef,
    Reporter,
    now_rfc3339,
)
from istio_pod_network_controller.podfacts import pod_facts


def detail(node: str) -> dict[str, Any]:
    """A mark of the agent's shape and about its size (so both write and watch the same bytes)."""
    return {
        "netnsInode": 4026532000,
        "rulesetSha256": "0" * 64,
        "appliedAt": now_rfc3339(),
        "mode": "iptables",
        "backend": "nft",
        "rules": 20,
        "applyMs": 0.0,
        "node": node,
        "args": [
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
        ],
        "proxyUids": [1337],
        "proxyGids": [1337],
        "verify": {"port": 15001, "address": "127.0.0.6", "uid": 1337, "gid": 1337, "token": "0" * 32},
    }


class Floor:
    """One node's controller. ``namespaces``: also list and watch every namespace, as the agent
    does (for the many-node simulation, where that watch's fan-out is part of the cost)."""

    def __init__(self, api: Api, node: str, workers: int, *, namespaces: bool = False) -> None:
        self.node = node
        self.reporter = Reporter(api, node)
        self.events = EventRecorder(api, node)
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self.done: set[str] = set()
        self.marked = 0
        self.workers = workers
        self.pods = Reflector(api, "/api/v1/pods", "pods", uid_key, self._changed,
                              field_selector=f"spec.nodeName={node}")  # fmt: skip
        self.namespaces = (
            Reflector(api, "/api/v1/namespaces", "namespaces", name_key, lambda key, obj: None)
            if namespaces
            else None
        )
        self._tasks: list[asyncio.Task[Any]] = []

    def _changed(self, uid: str, raw: dict[str, Any] | None) -> None:
        if raw is None:
            self.done.discard(uid)
            return
        if uid in self.done or uid in self.queued:
            return
        self.queued.add(uid)
        self.queue.put_nowait(uid)

    async def _worker(self) -> None:
        while True:
            uid = await self.queue.get()
            self.queued.discard(uid)
            raw = self.pods.store.get(uid)
            if raw is None:
                continue
            pod = pod_facts(raw)
            if pod.annotations.get(names.OPT_IN) != names.OPT_IN_VALUE or not pod.ips:
                continue
            if pod.annotations.get(names.STATUS) == names.STATUS_INITIALIZED:
                self.done.add(uid)  # marked already (a restarted controller's first list)
                continue
            ref = PodRef.of(pod)
            self.done.add(uid)  # before the await: an update arriving meanwhile must not patch again
            try:
                await self.reporter.set_status(ref, names.STATUS_INITIALIZED, detail(self.node))
            except PodGone:
                self.done.discard(uid)
                continue
            self.marked += 1
            self.events.record(
                ref, kind="Normal", reason="Initialized", message="floor: marked, no node work"
            )

    async def start(self) -> None:
        """Returns once the first lists are in."""
        self.events.start()
        if self.namespaces is not None:
            self._tasks.append(asyncio.create_task(self.namespaces.run()))
            await self.namespaces.synced.wait()
        self._tasks.append(asyncio.create_task(self.pods.run()))
        await self.pods.synced.wait()
        self._tasks += [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        await self.events.stop(timeout=5)

    async def run(self) -> None:
        await self.start()
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()


async def main_async(kubeconfig: str, node: str, workers: int) -> None:
    api = Api.from_kubeconfig(kubeconfig)
    try:
        await Floor(api, node, workers).run()
    finally:
        with contextlib.suppress(Exception):
            await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    if args.workers < 1:
        sys.exit("--workers must be at least 1")
    asyncio.run(main_async(args.kubeconfig, args.node_name, args.workers))


if __name__ == "__main__":
    main()
