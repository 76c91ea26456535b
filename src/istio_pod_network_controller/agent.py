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
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import names
from .cluster.api import Api
from .cluster.reflector import Reflector, cancel_all, name_key, uid_key
from .cluster.report import (
    EventRecorder,
    EventType,
    PodGone,
    PodRef,
    Reporter,
    now_rfc3339,
    read_detail,
    read_status,
    status_patch,
)
from .decide import DEFAULT_EXCLUDED_NAMESPACES, decide
from .node import locate
from .node.apply import ApplyResult
from .node.errors import LocateError, NodeError
from .node.handoff import Handoffs, listen_in
from .node.netns import Netns, NetnsId, netns_cookie, netns_id_of
from .node.programmer import NodeApplier, Planned
from .observe import Metrics, ReconcileResult
from .podfacts import NamespaceFacts, PodFacts, as_mapping, namespace_facts, pod_facts
from .probe import VERIFY_KEY, probe_plan, waiter_ids
from .refresh import DETAIL_KEY as REFRESH_KEY
from .refresh import Leave, LookAgain, RefreshPolicy, refresh_step
from .spec import RedirectSpec, SpecError, parse_flags, spec_from_pod
from .spec.canonical import to_args
from .workqueue import ShutDown, WorkQueue

log = logging.getLogger(__name__)
T = TypeVar("T")


class Outcome(enum.Enum):
    DONE = "done"  # nothing more to do until the pod changes
    RETRY = "retry"  # try again with backoff

    @property
    def result(self) -> ReconcileResult:
        """controller-runtime's name for it, in the reconcile metrics."""
        return ReconcileResult.SUCCESS if self is Outcome.DONE else ReconcileResult.REQUEUE


@dataclass(frozen=True, slots=True)
class After:
    """Done for now, but look again in ``seconds`` (controller-runtime's RequeueAfter): a pod
    whose waiter may still be waiting for the kubelet to show it the mark."""

    seconds: float

    @property
    def result(self) -> ReconcileResult:
        return ReconcileResult.REQUEUE_AFTER


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    proc_root: str = "/proc"
    workers: int = 4
    excluded_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES
    resync_seconds: float = 300.0
    retry_base_seconds: float = 0.05
    retry_max_seconds: float = 30.0
    # One reconcile may take this long; past it the worker gives up on it (and retries later),
    # and a node call still running past it turns liveness red.
    reconcile_deadline_seconds: float = 60.0
    # The event loop must tick at least this often, or liveness turns red.
    stall_seconds: float = 10.0
    # When to write a mark again while the pod's waiter still runs (see ``refresh``).
    refresh: RefreshPolicy = field(default_factory=RefreshPolicy)
    # Hand each waiter its mark in its pod's namespace too (see ``handoff``).
    handoff: bool = True


Locator = Callable[[str, tuple[str, ...]], Netns]


def default_locator(proc_root: str) -> Locator:
    def find(uid: str, ips: tuple[str, ...]) -> Netns:
        return locate.by_pod_uid(uid, pod_ips=ips, proc_root=proc_root)

    return find


@dataclass(frozen=True, slots=True)
class Plan:
    """The rules for one sandbox, and the flags they were built from (kept in the mark, so the
    same rules can be rebuilt for that sandbox without reading the pod's annotations again)."""

    spec: RedirectSpec
    ruleset: Planned
    sha: str
    args: tuple[str, ...]

    @classmethod
    def of(cls, spec: RedirectSpec, render: Callable[[RedirectSpec], Planned]) -> Plan:
        ruleset = render(spec)
        return cls(spec, ruleset, ruleset.sha256(), tuple(to_args(spec)))


def plan_from_pod(
    pod: PodFacts, namespace: NamespaceFacts | None, render: Callable[[RedirectSpec], Planned]
) -> Plan:
    """Raises SpecError. Runs in a worker thread: its cost grows with the pod."""
    return Plan.of(spec_from_pod(pod, namespace), render)


def plan_from_mark(args: Sequence[str], render: Callable[[RedirectSpec], Planned]) -> Plan:
    """Raises SpecError. The flags come from our own mark, but go through the same parser."""
    return Plan.of(parse_flags(args), render)


@dataclass
class Programmed:
    """What this process applied to one pod's sandbox: the agent's answer to "is this pod done?".

    Annotations never answer it. Within one process this record does; a process without one (a
    restart, a recreated sandbox) reads the namespace back first. The mark we wrote is kept as
    text with the resourceVersion our patch produced: once the watch has brought that version
    back, a pod showing anything else had its mark changed by someone else.
    """

    netns_path: str
    netns: NetnsId
    pod_ips: tuple[str, ...]
    plan: Plan
    verify: dict[str, Any]  # the waiter's probe plan (see ``probe``), for the mark
    detail: str = ""  # the detail annotation as we wrote it (or found it, intact)
    mark_version: str = ""
    mark_seen: bool = False
    detail_fields: dict[str, Any] = field(default_factory=dict)  # ``detail``, parsed
    written_at: float = 0.0  # the agent's clock when the mark was last written (or found)
    # The namespace's cookie (None on kernels without them): unlike its inode number, never
    # handed to a later sandbox, so the waiter of a recreated one cannot take our mark for its own.
    cookie: int | None = None
    nudges: int = 0  # marks written again for this sandbox because its waiter still ran
    gave_up: bool = False  # every nudge spent and the waiter still ran (said once)

    def same_sandbox(self, ips: tuple[str, ...]) -> bool:
        """The pod still lives in the namespace we programmed (one stat, no scan): a recreated
        sandbox has a new namespace, and most often new IPs."""
        if ips != self.pod_ips:
            return False
        try:
            return netns_id_of(self.netns_path) == self.netns
        except OSError:
            return False


def _ms_since(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 1)


def _marked_args(pod: PodFacts, inode: int, cookie: int | None) -> tuple[str, ...] | None:
    """The flags of an ``initialized`` mark for this very namespace, if the pod carries one:
    where a previous agent process left the sandbox's rules. Only a hint of what to re-check,
    never proof that the rules are there."""
    if read_status(pod) != names.STATUS_INITIALIZED:
        return None
    detail = read_detail(pod)
    args = detail.get("args")
    if detail.get("netnsInode") != inode or not isinstance(args, list):
        return None
    marked_cookie = detail.get("netnsCookie")
    if cookie is not None and marked_cookie is not None and marked_cookie != cookie:
        return None  # an earlier sandbox whose namespace had the same inode number
    if not all(isinstance(a, str) for a in args):
        return None
    return tuple(args)


@dataclass
class Agent:
    config: AgentConfig
    api: Api
    applier: NodeApplier[Any]
    metrics: Metrics = field(default_factory=Metrics)
    locator: Locator | None = None
    clock: Callable[[], float] = time.monotonic  # for the refresh's waits (tests pass their own)

    def __post_init__(self) -> None:
        self.queue = WorkQueue(
            base_delay=self.config.retry_base_seconds,
            max_delay=self.config.retry_max_seconds,
            metrics=self.metrics.queue_metrics(),
        )
        self.metrics.agent_info.labels(self.applier.mode, self.applier.backend).set(1)
        self.reporter = Reporter(self.api, self.config.node_name)
        self.events = EventRecorder(self.api, self.config.node_name, on_drop=self.metrics.event_dropped)
        self.handoffs = Handoffs(on_result=lambda result: self.metrics.handoffs.labels(result).inc())
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
        self._workers: list[asyncio.Task[None]] = []
        self._start_task: asyncio.Task[None] | None = None
        self._last_beat = time.monotonic()
        self._programmed: dict[str, Programmed] = {}
        self._recheck: set[str] = set()  # pods whose namespace is read back at their next reconcile
        self._node_calls: dict[int, float] = {}  # running node calls -> monotonic start

    # -- events -> keys ---------------------------------------------------------------------

    def _pod_changed(self, uid: str, pod: dict[str, Any] | None) -> None:
        self.queue.add(uid)
        self.metrics.pods_watched.set(len(self.pods.store))

    def _namespace_changed(self, name: str, namespace: dict[str, Any] | None) -> None:
        # The opt-in may live on the namespace: re-check its pods on this node.
        for uid, pod in self.pods.store.items():
            if as_mapping(pod.get("metadata")).get("namespace") == name:
                self.queue.add(uid)

    # -- the reconcile: decide -> locate -> plan -> apply -> report ----------------------------

    async def reconcile(self, uid: str) -> Outcome | After:
        raw = self.pods.store.get(uid)
        if raw is None:
            self._forget(uid)
            return Outcome.DONE  # deleted meanwhile: nothing to undo, the namespace went with it
        pod = pod_facts(raw)
        if pod.deleting or pod.phase in ("Succeeded", "Failed"):
            self._forget(uid)
            return Outcome.DONE
        namespace = namespace_facts(self.namespaces.store.get(pod.namespace))
        if not decide(pod, namespace, excluded_namespaces=self.config.excluded_namespaces).ours:
            self.handoffs.close(uid, "gone")
            return Outcome.DONE
        if pod.waiter_state == "terminated":
            self.handoffs.close(uid, "waiter_done")
        if not pod.ips:
            # The kubelet reports the pod's IPs once its sandbox is up. Until then the namespace
            # cannot be checked against them, and an IPv6 address would be missed (no ip6tables
            # rules). The status update that brings them queues the pod again.
            return Outcome.DONE
        recheck = uid in self._recheck
        self._recheck.discard(uid)
        ref = PodRef.of(pod)
        fields: dict[str, Any] = {"pod": f"{ref.namespace}/{ref.name}", "uid": uid}
        record = self._programmed.get(uid)
        if record is not None and record.same_sandbox(pod.ips):
            # Programmed by this process: the rules belong to this sandbox whatever the pod's
            # annotations say now. Read back only when a re-check is due.
            return await self._keep(pod, ref, record, recheck=recheck, fields=fields)
        self._programmed.pop(uid, None)
        began = time.monotonic()
        try:
            netns = await self._off_loop(self.find_netns, uid, pod.ips)
            fields["locateMs"] = _ms_since(began)
        except LocateError as exc:
            log.info("network namespace not there yet", extra={**fields, "reason": exc.reason})
            self.metrics.errors.labels("netns_not_found").inc()
            return Outcome.RETRY
        try:
            return await self._program(pod, namespace, ref, netns, fields)
        finally:
            netns.close()

    async def _program(
        self,
        pod: PodFacts,
        namespace: NamespaceFacts | None,
        ref: PodRef,
        netns: Netns,
        fields: dict[str, Any],
    ) -> Outcome | After:
        """A sandbox this process has no record of: a new one (planned from the pod), or one a
        previous process marked (planned from the flags in that mark, then read back)."""
        began = time.monotonic()
        try:
            cookie = await self._cookie_and_listener(pod, ref, netns)
        except NodeError as exc:
            return await self._apply_failed(pod, ref, exc, fields, netns.inode)
        marked = _marked_args(pod, netns.inode, cookie)
        try:
            plan = await self._plan(pod, namespace, marked)
            fields["prepareMs"] = _ms_since(began)  # cookie, hand-off listener, rules planned
        except SpecError as exc:
            await self._report_error(pod, ref, "InvalidConfiguration", str(exc), fields)
            return Outcome.DONE  # no retry until the pod changes
        try:
            result = await self._off_loop(self.applier.apply, netns, plan.ruleset, fresh=marked is None)
        except NodeError as exc:
            return await self._apply_failed(pod, ref, exc, fields, netns.inode)
        uid, gid = waiter_ids(pod)
        verify = probe_plan(plan.spec, uid=uid, gid=gid)
        record = Programmed(netns.path, netns.id, pod.ips, plan, verify, cookie=cookie)
        if marked is not None and result.changed:
            self._drift_repaired(ref, result, fields)
        if marked is not None and not result.changed and read_detail(pod).get("rulesetSha256") == plan.sha:
            # Intact and marked: nothing to write (unless its waiter, still running, has not been
            # shown the mark: the refresh below counts from now).
            record.detail, record.mark_seen = pod.annotations[names.DETAIL], True
            self.handoffs.ready(ref.uid, names.STATUS_INITIALIZED, record.detail)
            record.detail_fields, record.written_at = read_detail(pod), self.clock()
            self._programmed[ref.uid] = record
            log.info("pod re-checked: rules intact", extra={**fields, "netnsInode": result.inode})
            return await self._refresh(pod, ref, record, fields)
        return await self._mark(ref, record, result, fields, announce=True)

    async def _cookie_and_listener(self, pod: PodFacts, ref: PodRef, netns: Netns) -> int | None:
        """The namespace's cookie; and, while the pod's waiter may still wait, a listener in the
        namespace to hand it the mark (see ``handoff``), made by the same trip into it. Raises
        NodeError when the namespace cannot be entered."""
        kept = self.handoffs.listening(ref.uid, netns.id)
        if kept is not None:
            return kept[0]  # a retry: the listener made for this namespace is still there
        skip = pod.waiter_state == "terminated" or self.handoffs.refused(ref.uid, netns.id)
        if not self.config.handoff or skip or not self.handoffs.room():
            return await self._off_loop(netns_cookie, netns)
        opened = await self._off_loop(listen_in, netns)
        if opened.listener is None:
            log.info(
                "no hand-off for this pod: the mark goes by its annotations only",
                extra={"pod": f"{ref.namespace}/{ref.name}", "uid": ref.uid, "reason": opened.why},
            )
        self.handoffs.open(ref.uid, netns.id, opened)
        return opened.cookie

    async def _plan(
        self, pod: PodFacts, namespace: NamespaceFacts | None, marked: tuple[str, ...] | None
    ) -> Plan:
        """The rules for the sandbox: from the flags of our own mark on it, else from the pod.
        Raises SpecError (the pod's, never the mark's)."""
        if marked is not None:
            try:
                return await self._off_loop(plan_from_mark, marked, self.applier.render)
            except SpecError:
                pass  # not a mark we wrote: plan from the pod as for a new sandbox
        return await self._off_loop(plan_from_pod, pod, namespace, self.applier.render)

    async def _keep(
        self,
        pod: PodFacts,
        ref: PodRef,
        record: Programmed,
        *,
        recheck: bool,
        fields: dict[str, Any],
    ) -> Outcome | After:
        """A sandbox this process programmed: its rules read back when a re-check is due, its
        mark kept, and written again while its waiter has not been shown it (``_refresh``)."""
        if recheck:
            failed = await self._read_back(pod, ref, record, fields)
            if failed is not None:
                return failed
        shown = (
            pod.annotations.get(names.DETAIL) == record.detail
            and read_status(pod) == names.STATUS_INITIALIZED
        )
        if shown or (record.mark_version and pod.resource_version == record.mark_version):
            record.mark_seen = True  # equality only: resourceVersions are opaque
        if shown:
            return await self._refresh(pod, ref, record, fields)
        if not (record.mark_seen or recheck):
            return Outcome.DONE  # our own patch is still on its way back
        log.warning("mark changed by someone else: writing it again", extra=fields)
        inode = record.netns.inode
        result = ApplyResult(record.netns_path, inode, self.applier.backend,
                             record.plan.ruleset.rule_count(), False, 0.0,
                             mode=self.applier.mode)  # fmt: skip
        return await self._mark(ref, record, result, fields, announce=False)

    async def _read_back(
        self, pod: PodFacts, ref: PodRef, record: Programmed, fields: dict[str, Any]
    ) -> Outcome | None:
        """Read the rules back and repair any drift; an Outcome only when that failed."""
        try:
            netns = Netns(record.netns_path)
        except (NodeError, OSError):
            self._programmed.pop(ref.uid, None)
            return Outcome.RETRY  # gone between the stat and the open: look again
        try:
            if netns.id != record.netns:
                self._programmed.pop(ref.uid, None)
                return Outcome.RETRY
            result = await self._off_loop(self.applier.apply, netns, record.plan.ruleset, fresh=False)
        except NodeError as exc:
            return await self._apply_failed(pod, ref, exc, fields, netns.inode)
        finally:
            netns.close()
        if result.changed:
            self._drift_repaired(ref, result, fields)
        return None

    async def _mark(
        self, ref: PodRef, record: Programmed, result: ApplyResult, fields: dict[str, Any], *, announce: bool
    ) -> Outcome:
        spec = record.plan.spec
        detail: dict[str, Any] = {
            "netnsInode": result.inode,
            **({"netnsCookie": record.cookie} if record.cookie is not None else {}),
            "rulesetSha256": record.plan.sha,
            "appliedAt": now_rfc3339(),
            "mode": result.mode,
            "backend": result.backend,
            "rules": result.rules,
            "applyMs": round(result.milliseconds, 2),
            "node": self.config.node_name,
            # The flags these rules were built from: the rules of this sandbox, rebuilt from here
            # (never from the pod's annotations) when another agent process re-checks it.
            "args": list(record.plan.args),
            # Which users the rules leave alone (the waiter cannot see the proxy's securityContext
            # or the namespace the agent took them from).
            "proxyUids": list(spec.proxy_uids),
            "proxyGids": list(spec.proxy_gids),
            # How the waiter proves the redirect: planned here, from the rules applied and the
            # waiter's IDs, so that nothing the pod can write decides whether or how it probes.
            VERIFY_KEY: record.verify,
        }
        began = time.monotonic()
        if not await self._write_mark(ref, record, detail):
            return Outcome.DONE
        fields = {**fields, "patchMs": _ms_since(began)}
        # Recorded only once marked: a patch that fails (the API server away) leaves no record,
        # so the retry programs and marks the sandbox again instead of taking it for done.
        self._programmed[ref.uid] = record
        if not announce:
            return Outcome.DONE
        self.metrics.initialized.inc()
        self.metrics.apply_seconds.observe(result.milliseconds / 1000)
        log.info("pod initialized",
                 extra={**fields, "netnsInode": result.inode, "rules": result.rules,
                        "ms": round(result.milliseconds, 2)})  # fmt: skip
        self._event(
            ref,
            kind="Normal",
            reason="Initialized",
            message=f"redirect rules applied and verified: {result.rules} rules in network namespace "
            f"{result.inode} ({result.mode} mode, {result.backend} backend, {result.milliseconds:.1f} ms)",
        )
        return Outcome.DONE

    async def _refresh(
        self, pod: PodFacts, ref: PodRef, record: Programmed, fields: dict[str, Any]
    ) -> Outcome | After:
        """The mark is on the pod as we wrote it. If the waiter still runs a while after that
        write, the kubelet may have lost the update that should have rewritten its file: write
        the mark again, changed (``refresh``: how many times), so that the kubelet syncs the pod
        and rewrites the file. Bounded per sandbox; see ``refresh``."""
        step = refresh_step(
            waiter_running=pod.waiter_state == "running",
            since_write=self.clock() - record.written_at,
            nudges=record.nudges,
            policy=self.config.refresh,
        )
        if isinstance(step, LookAgain):
            return After(step.seconds)
        if isinstance(step, Leave):
            if step.gave_up and not record.gave_up:
                record.gave_up = True
                log.warning(
                    "waiter still running after every refresh of the mark: left to the kubelet's "
                    "periodic sync",
                    extra={**fields, "netnsInode": record.netns.inode, "nudges": record.nudges},
                )
            return Outcome.DONE
        if not await self._write_mark(ref, record, {**record.detail_fields, REFRESH_KEY: step.number}):
            return Outcome.DONE
        record.nudges = step.number
        self.metrics.refresh_nudges.inc()
        log.debug(
            "waiter still running after the mark: mark written again so that the kubelet rewrites "
            "the pod's downward API file",
            extra={**fields, "netnsInode": record.netns.inode, "nudge": step.number},
        )
        return Outcome.DONE

    async def _write_mark(self, ref: PodRef, record: Programmed, detail: dict[str, Any]) -> bool:
        """Patch the ``initialized`` mark with ``detail`` and note it in ``record``; False when the
        pod is gone (its record dropped). Other API errors propagate (the caller retries)."""
        written = status_patch(ref, names.STATUS_INITIALIZED, detail)["metadata"]["annotations"][names.DETAIL]
        # The rules are applied and verified: the waiter may have the mark now, before the patch
        # (which stays the durable record) has gone to the API server and back through the kubelet.
        self.handoffs.ready(ref.uid, names.STATUS_INITIALIZED, written)
        try:
            version = await self.reporter.set_status(ref, names.STATUS_INITIALIZED, detail)
        except PodGone:
            self._programmed.pop(ref.uid, None)
            return False
        record.detail, record.detail_fields = written, detail
        record.mark_version, record.mark_seen = version, False
        record.written_at = self.clock()
        return True

    def _drift_repaired(self, ref: PodRef, result: ApplyResult, fields: dict[str, Any]) -> None:
        what = result.replaced or "rules of ours missing"
        self.metrics.drift_repaired.inc()
        log.warning("rules drifted: re-applied",
                    extra={**fields, "netnsInode": result.inode, "found": what})  # fmt: skip
        self._event(
            ref,
            kind="Normal",
            reason="DriftRepaired",
            message=f"redirect rules in network namespace {result.inode} were not as applied ({what}); "
            f"re-applied and verified",
        )

    def _forget(self, uid: str) -> None:
        self.handoffs.close(uid, "gone")
        self._programmed.pop(uid, None)
        self._recheck.discard(uid)

    async def _off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking or CPU-bound work (the /proc scan, iptables, parsing a pod's flags) on a
        node thread, so one pod can hold at most its worker, never the event loop. Running calls
        are timed: one past the reconcile deadline turns liveness red."""
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        token = id(call)
        self._node_calls[token] = time.monotonic()
        try:
            return await loop.run_in_executor(self.executor, call)
        finally:
            self._node_calls.pop(token, None)

    def _event(self, ref: PodRef, *, kind: EventType, reason: str, message: str) -> None:
        """Posted by the recorder's background task: never on the reconcile path."""
        self.events.record(ref, kind=kind, reason=reason, message=message)

    async def _apply_failed(
        self, pod: PodFacts, ref: PodRef, exc: NodeError, fields: dict[str, Any], inode: int
    ) -> Outcome:
        await self._report_error(pod, ref, "ApplyFailed", f"{exc.step}: {exc.reason}", fields, inode)
        return Outcome.RETRY

    async def _report_error(
        self,
        pod: PodFacts,
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
        self._event(ref, kind="Warning", reason=reason, message=message)

    # -- workers and lifecycle --------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            try:
                uid = await self.queue.get()
            except ShutDown:
                return
            outcome: Outcome | After | None = None
            started = time.monotonic()
            try:
                outcome = await asyncio.wait_for(
                    self.reconcile(uid), timeout=self.config.reconcile_deadline_seconds
                )
            except TimeoutError:
                log.error(
                    "reconcile ran past its deadline: given up, retried later",
                    extra={"uid": uid, "deadlineSeconds": self.config.reconcile_deadline_seconds},
                )
                self.metrics.reconcile_deadline_exceeded.inc()  # fmt: skip
            except Exception as exc:  # an API hiccup or a bug: log it, retry, keep serving
                log.error("reconcile failed", extra={"uid": uid, "error": f"{type(exc).__name__}: {exc}"})
                self.metrics.errors.labels("internal").inc()
            finally:
                result = outcome.result if outcome is not None else ReconcileResult.ERROR
                self.metrics.observe_reconcile(result, time.monotonic() - started)
                self.queue.done(uid)
                try:
                    if isinstance(outcome, After) and uid in self.pods.store:
                        self.queue.forget(uid)  # not a failure: the back-off starts again
                        self.queue.add_after(uid, outcome.seconds)
                    elif outcome is not Outcome.DONE and uid in self.pods.store:
                        self.queue.add_rate_limited(uid)
                    else:
                        self.queue.forget(uid)
                except Exception as exc:  # the queue must never take a worker down with it
                    log.error("requeue failed", extra={"uid": uid, "error": f"{type(exc).__name__}: {exc}"})
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
        """Every period, every pod again, and each programmed namespace read back: rules deleted
        by hand or overwritten by another tool are found and repaired here."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for uid in list(self.pods.store):
                self._recheck.add(uid)
                self.queue.add(uid)

    async def _heartbeat(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            self.queue.update_unfinished_work()
            await asyncio.sleep(min(1.0, self.config.stall_seconds / 4))

    def health_problem(self) -> str | None:
        """Why the agent should be restarted, or None. Called from the health server's thread."""
        now = time.monotonic()
        lag = now - self._last_beat
        if lag > self.config.stall_seconds:
            return f"event loop stalled for {lag:.1f}s"
        start = self._start_task
        if start is not None and start.done() and (start.cancelled() or start.exception() is not None):
            return "start-up failed"
        ended = [t.get_name() for t in [*self._tasks, *self._workers] if t.done()]
        if ended:
            return f"task ended: {', '.join(ended)}"
        oldest = min(self._node_calls.values(), default=now)
        if now - oldest > self.config.reconcile_deadline_seconds:
            return f"a node call has run for {now - oldest:.0f}s, past the reconcile deadline"
        return None

    def healthy(self) -> bool:
        problem = self.health_problem()
        if problem is not None:
            log.error("unhealthy", extra={"reason": problem})
        return problem is None

    def launch(self) -> asyncio.Task[None]:
        """Start in the background; a start-up that fails turns liveness red."""
        self._start_task = asyncio.create_task(self.start(), name="start")
        return self._start_task

    async def start(self) -> None:
        """Start watching and working; returns once both stores have their first list."""
        # The loop is alive while the first lists load, however long a large node takes: the
        # liveness probe must not restart an agent that is still listing.
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        self.events.start()
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
                "mode": self.applier.mode,
                "backend": self.applier.backend,
            },
        )

    async def stop(self) -> None:
        """Drain: stop watching, let workers finish the pods in hand, then return."""
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
        await cancel_all(self._tasks)
        self.queue.shut_down()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._workers)
        self.handoffs.close_all()  # after the workers: none opens one behind it
        await self.events.stop(timeout=5)
        # Threads still in a node call finish on their own; waiting for them here would block
        # the loop (and the signal handling) for as long as they take.
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)
        log.info("agent stopped")
