"""The node agent: a level-triggered reconcile loop over the pods of one node.

Two reflectors (pods of this node, namespaces) keep local stores; every change queues the pod's
UID; a bounded pool of workers runs ``reconcile(uid)``, which reads the current pod from the
store and drives it to "rules applied, verified and marked" -- so it can run twice, late, or
after a crash without harm. The steps are the data flow of the design:
pod -> decision -> spec -> rules -> namespace -> verified -> status.
Blocking node work (the /proc scan, iptables-restore) runs in a thread pool of the same size.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import names
from .cluster.api import Api
from .cluster.reflector import Reflector, cancel_all, name_key, uid_key
from .cluster.report import PodGone, PodRef, Reporter, now_rfc3339, read_detail, read_status
from .decide import DEFAULT_EXCLUDED_NAMESPACES, decide
from .node import locate
from .node.apply import Applier, ApplyResult
from .node.errors import LocateError, NodeError
from .node.netns import Netns, NetnsId, netns_id_of
from .observe import Metrics
from .render import Ruleset, render
from .spec import OutOfScope, SpecError, spec_from_pod
from .workqueue import ShutDown, WorkQueue

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    DONE = "done"  # nothing more to do until the pod changes
    RETRY = "retry"  # try again with backoff


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    proc_root: str = "/proc"
    workers: int = 4
    excluded_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES
    resync_seconds: float = 300.0
    retry_base_seconds: float = 0.05
    retry_max_seconds: float = 30.0


Locator = Callable[[str, tuple[str, ...]], Netns]


def default_locator(proc_root: str) -> Locator:
    def find(uid: str, ips: tuple[str, ...]) -> Netns:
        return locate.by_pod_uid(uid, pod_ips=ips, proc_root=proc_root)

    return find


def _version(text: str) -> int | None:
    """A resourceVersion as a number, to tell older from newer. Kubernetes calls them opaque,
    but with etcd they are its revision: a decimal integer. None when one is not."""
    return int(text) if text.isdigit() else None


def pod_ips(pod: Mapping[str, Any]) -> tuple[str, ...]:
    status = pod.get("status") or {}
    ips = [item.get("ip") for item in status.get("podIPs") or [] if isinstance(item, Mapping)]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return tuple(ip for ip in ips if isinstance(ip, str))


@dataclass
class Agent:
    config: AgentConfig
    api: Api
    applier: Applier
    metrics: Metrics = field(default_factory=Metrics)
    locator: Locator | None = None

    def __post_init__(self) -> None:
        self.queue = WorkQueue(
            base_delay=self.config.retry_base_seconds, max_delay=self.config.retry_max_seconds
        )
        self.reporter = Reporter(self.api, self.config.node_name)
        self.executor = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="node")
        self.find_netns = self.locator or default_locator(self.config.proc_root)
        self.pods = Reflector(
            self.api,
            "/api/v1/pods",
            "pods",
            uid_key,
            self._pod_changed,
            field_selector=f"spec.nodeName={self.config.node_name}",
            on_restart=lambda cause: self.metrics.watch_restarts.labels("pods", cause).inc(),
        )
        self.namespaces = Reflector(
            self.api,
            "/api/v1/namespaces",
            "namespaces",
            name_key,
            self._namespace_changed,
            on_restart=lambda cause: self.metrics.watch_restarts.labels("namespaces", cause).inc(),
        )
        self._initial: set[str] | None = None  # UIDs of the first list not yet reconciled
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_beat = time.monotonic()
        # uid -> (netns path, identity, pod IPs then) where we last found the pod's sandbox
        self._seen: dict[str, tuple[str, NetnsId, tuple[str, ...]]] = {}
        # uid -> (netns inode, ruleset sha, resourceVersion of our patch) of the last mark we wrote
        self._written: dict[str, tuple[int, str, int | None]] = {}

    # -- events -> keys ---------------------------------------------------------------------

    def _pod_changed(self, uid: str, pod: dict[str, Any] | None) -> None:
        self.queue.add(uid)
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.pods_watched.set(len(self.pods.store))

    def _namespace_changed(self, name: str, namespace: dict[str, Any] | None) -> None:
        # The opt-in may live on the namespace: re-check its pods on this node.
        for uid, pod in self.pods.store.items():
            if pod.get("metadata", {}).get("namespace") == name:
                self.queue.add(uid)

    # -- the reconcile ----------------------------------------------------------------------

    async def reconcile(self, uid: str) -> Outcome:
        pod = self.pods.store.get(uid)
        if pod is None:
            self._seen.pop(uid, None)
            self._written.pop(uid, None)
            return Outcome.DONE  # deleted meanwhile: nothing to undo, the namespace went with it
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return Outcome.DONE
        namespace = self.namespaces.store.get(meta.get("namespace", ""))
        decision = decide(pod, namespace, excluded_namespaces=self.config.excluded_namespaces)
        if not decision.ours:
            return Outcome.DONE
        ref = PodRef.of(pod)
        fields = {"pod": f"{ref.namespace}/{ref.name}", "uid": uid}

        try:
            spec = spec_from_pod(pod, namespace)
        except OutOfScope:
            return Outcome.DONE
        except SpecError as exc:
            await self._report_error(pod, ref, "InvalidConfiguration", str(exc), fields)
            return Outcome.DONE  # no retry until the pod changes
        ruleset = render(spec)
        sha = ruleset.sha256()

        if not pod_ips(pod):
            # The kubelet reports the pod's IPs once its sandbox is up. Until then the namespace
            # cannot be checked against them, and an IPv6 address would be missed (no ip6tables
            # rules). The status update that brings them queues the pod again.
            return Outcome.DONE
        if self._still_programmed(uid, pod, sha):
            return Outcome.DONE  # e.g. the echo of our own status patch: no /proc scan needed
        loop = asyncio.get_running_loop()
        try:
            netns = await loop.run_in_executor(self.executor, self.find_netns, uid, pod_ips(pod))
        except LocateError as exc:
            log.info("network namespace not there yet", extra={**fields, "reason": exc.reason})
            self.metrics.errors.labels("netns_not_found").inc()
            return Outcome.RETRY
        try:
            self._seen[uid] = (netns.path, netns.id, pod_ips(pod))
            if self._marked(uid, pod, netns.inode, sha):
                return Outcome.DONE  # already programmed for this very namespace
            try:
                result = await loop.run_in_executor(self.executor, self._apply, netns, ruleset)
            except NodeError as exc:
                await self._report_error(
                    pod, ref, "ApplyFailed", f"{exc.step}: {exc.reason}", fields, netns.inode
                )
                return Outcome.RETRY
        finally:
            netns.close()

        detail = {
            "netnsInode": result.inode,
            "rulesetSha256": sha,
            "appliedAt": now_rfc3339(),
            "backend": result.backend,
            "rules": result.rules,
            "applyMs": round(result.milliseconds, 2),
            "node": self.config.node_name,
            # For the waiter's --verify: which users the rules leave alone (it cannot see the
            # proxy's securityContext or the namespace the agent took them from).
            "proxyUids": list(spec.proxy_uids),
            "proxyGids": list(spec.proxy_gids),
        }
        try:
            version = await self.reporter.set_status(ref, names.STATUS_INITIALIZED, detail)
        except PodGone:
            return Outcome.DONE
        self._written[uid] = (result.inode, sha, _version(version))
        self.metrics.initialized.inc()
        self.metrics.apply_seconds.observe(result.milliseconds / 1000)
        log.info(
            "pod initialized",
            extra={
                **fields,
                "netnsInode": result.inode,
                "rules": result.rules,
                "ms": round(result.milliseconds, 2),
            },
        )
        await self.reporter.event(
            ref,
            kind="Normal",
            reason="Initialized",
            message=f"redirect rules applied and verified: {result.rules} rules in network namespace "
            f"{result.inode} ({result.backend} backend, {result.milliseconds:.1f} ms)",
        )
        return Outcome.DONE

    def _marked(self, uid: str, pod: Mapping[str, Any], inode: int, sha: str) -> bool:
        """Is the pod marked initialized for this namespace and ruleset? Either its annotations
        say so, or we wrote that mark and the pod in our cache predates our write (the watch
        has not brought our own patch back yet): without this, every other event arriving in
        between would program the pod again."""
        detail = read_detail(pod)
        if (
            read_status(pod) == names.STATUS_INITIALIZED
            and detail.get("netnsInode") == inode
            and detail.get("rulesetSha256") == sha
        ):
            return True
        written = self._written.get(uid)
        if written is None or written[:2] != (inode, sha):
            return False
        cached = _version(str(pod.get("metadata", {}).get("resourceVersion", "")))
        return cached is not None and written[2] is not None and cached < written[2]

    def _still_programmed(self, uid: str, pod: Mapping[str, Any], sha: str) -> bool:
        """True when the pod is marked initialized with this ruleset for the namespace we last
        found for it, and that namespace is still its sandbox's (one stat, no scan): the sandbox
        process still lives in the same namespace. A recreated sandbox fails this check."""
        seen = self._seen.get(uid)
        if seen is None or seen[2] != pod_ips(pod) or not self._marked(uid, pod, seen[1].inode, sha):
            return False  # a new pod IP means a new sandbox: look again
        try:
            return netns_id_of(seen[0]) == seen[1]
        except OSError:
            return False

    def _apply(self, netns: Netns, ruleset: Ruleset) -> ApplyResult:
        return self.applier.apply(netns, ruleset)

    async def _report_error(
        self,
        pod: Mapping[str, Any],
        ref: PodRef,
        reason: str,
        message: str,
        fields: dict[str, Any],
        inode: int | None = None,
    ) -> None:
        metric = "invalid_configuration" if reason == "InvalidConfiguration" else "apply_failed"
        self.metrics.errors.labels(metric).inc()
        previous = read_detail(pod)
        if read_status(pod) == names.STATUS_ERROR and previous.get("error") == message:
            return  # already said; do not repeat the Event on every retry
        log.warning("pod not initialized", extra={**fields, "reason": reason, "error": message})
        detail: dict[str, Any] = {"error": message, "reason": reason, "at": now_rfc3339()}
        if inode is not None:
            detail["netnsInode"] = inode
        try:
            await self.reporter.set_status(ref, names.STATUS_ERROR, detail)
        except PodGone:
            return
        await self.reporter.event(ref, kind="Warning", reason=reason, message=message)

    # -- workers and lifecycle --------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            try:
                uid = await self.queue.get()
            except ShutDown:
                return
            self.metrics.queue_depth.set(len(self.queue))
            try:
                outcome = await self.reconcile(uid)
            except Exception as exc:  # an API hiccup or a bug: log it, retry, keep serving
                log.exception("reconcile failed", extra={"uid": uid, "error": str(exc)})
                self.metrics.errors.labels("internal").inc()
                outcome = Outcome.RETRY
            finally:
                self.queue.done(uid)
            if outcome is Outcome.RETRY and uid in self.pods.store:
                self.queue.add_rate_limited(uid)
            else:
                self.queue.forget(uid)
            self._mark_initial_done(uid)

    def _mark_initial_done(self, uid: str) -> None:
        if self._initial is None:
            return
        self._initial.discard(uid)
        if not self._initial:
            self._initial = None
            self.ready.set()
            log.info("ready: first list processed")

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for uid in list(self.pods.store):
                self.queue.add(uid)

    async def _heartbeat(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(1)

    def healthy(self) -> bool:
        """The loop ticks, and no task that should run forever (watches, workers) has ended."""
        if any(task.done() for task in [*self._tasks, *getattr(self, "_workers", [])]):
            return False
        return time.monotonic() - self._last_beat < 30

    async def start(self) -> None:
        """Start watching and working; returns once both stores have their first list."""
        # The loop is alive while the first lists load, however long a large node takes: the
        # liveness probe must not restart an agent that is still listing.
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        self._tasks.append(asyncio.create_task(self.namespaces.run(), name="namespaces"))
        await self.namespaces.synced.wait()
        self._tasks.append(asyncio.create_task(self.pods.run(), name="pods"))
        await self.pods.synced.wait()
        self._initial = set(self.pods.store)
        if not self._initial:
            self._initial = None
            self.ready.set()
        self._workers = [
            asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self.config.workers)
        ]
        self._tasks.append(asyncio.create_task(self._resync(), name="resync"))
        log.info(
            "agent started",
            extra={
                "node": self.config.node_name,
                "workers": self.config.workers,
                "backend": self.applier.tools.backend.value,
            },
        )

    async def stop(self) -> None:
        """Drain: stop watching, let workers finish the pods in hand, then return."""
        await cancel_all(self._tasks)
        self.queue.shut_down()
        with contextlib.suppress(Exception):
            await asyncio.gather(*getattr(self, "_workers", []))
        self.executor.shutdown(wait=True)
        log.info("agent stopped")
