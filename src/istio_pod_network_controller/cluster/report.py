"""What the agent writes back to the cluster: the pod's status annotations and its Events.

The bodies are built by pure functions (tested without a cluster). ``Reporter`` patches the
status on the reconcile path: a patch names the pod's UID as a precondition, so a pod deleted and
recreated under the same name is never marked with another pod's result. ``EventRecorder`` writes
Events off that path, from a bounded queue and one sender task, and folds repeats into one Event
with a count, as client-go's recorder does: an API server that is slow to take Events slows
nobody's reconcile, and a pod failing in a loop makes one Event, not thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .. import names
from ..bounded import BoundedJsonError, loads_bounded
from ..podfacts import PodFacts, as_mapping
from .api import Api, ApiError

log = logging.getLogger(__name__)

COMPONENT = "istio-pod-network-controller"
MAX_MESSAGE = 1024

EventType = Literal["Normal", "Warning"]


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str
    resource_version: str = ""

    @classmethod
    def of(cls, pod: PodFacts) -> PodRef:
        return cls(pod.namespace or "default", pod.name, pod.uid, pod.resource_version)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"


def status_patch(ref: PodRef, status: str, detail: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": ref.uid,  # precondition: fails with 409 if the name now belongs to another pod
            "annotations": {
                names.STATUS: status,
                names.DETAIL: json.dumps(dict(detail), sort_keys=True, separators=(",", ":")),
            },
        }
    }


def sanitize_message(message: str) -> str:
    """One line of at most MAX_MESSAGE printable characters: a message may quote a value taken
    from a pod (an annotation), which must not forge extra lines in ``kubectl describe``."""
    line = "".join(char for char in " ".join(message.split()) if char.isprintable())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 1] + "\u2026"


def event_body(
    ref: PodRef,
    *,
    kind: str,
    reason: str,
    message: str,
    node: str,
    count: int = 1,
    first: str | None = None,
    last: str | None = None,
) -> dict[str, Any]:
    first = first or now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": ref.name,
            "namespace": ref.namespace,
            "uid": ref.uid,
            "resourceVersion": ref.resource_version,
        },
        "type": kind,
        "reason": reason,
        "message": sanitize_message(message),
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": first,
        "lastTimestamp": last or first,
        "count": count,
    }


def event_series_patch(*, count: int, last: str) -> dict[str, Any]:
    """The merge patch that folds more occurrences into an existing Event."""
    return {"count": count, "lastTimestamp": last}


def read_detail(pod: PodFacts) -> dict[str, Any]:
    raw = pod.annotations.get(names.DETAIL)
    if raw is None:
        return {}
    try:
        detail = loads_bounded(raw, max_bytes=names.MAX_DETAIL_BYTES, what=names.DETAIL)
    except BoundedJsonError:
        return {}  # not a detail the agent wrote: as if there were none
    return detail if isinstance(detail, dict) else {}


def read_status(pod: PodFacts) -> str | None:
    return pod.annotations.get(names.STATUS)


class PodGone(Exception):
    """The pod was deleted (404) or replaced by another of the same name (409)."""


class Reporter:
    def __init__(self, api: Api, node: str) -> None:
        self.api = api
        self.node = node

    async def set_status(self, ref: PodRef, status: str, detail: Mapping[str, Any]) -> str:
        """Patch the pod; returns the resourceVersion the patch produced."""
        try:
            patched = await self.api.merge_patch(ref.path, status_patch(ref, status, detail))
            return str(patched.get("metadata", {}).get("resourceVersion", ""))
        except ApiError as exc:
            # 404: deleted. Our UID in the patch no longer matching is a 409 or, for a merge patch,
            # a 422 on metadata.uid ("field is immutable"): the name belongs to another pod now.
            if exc.status in (404, 409) or (exc.status == 422 and "metadata.uid" in exc.message):
                raise PodGone(str(exc)) from None
            raise

    async def event(self, ref: PodRef, *, kind: str, reason: str, message: str) -> None:
        """Write one Event now and wait for it. Best effort: an Event that cannot be written is
        logged, never retried. The agent's reconcile path uses ``EventRecorder.record`` instead."""
        body = event_body(ref, kind=kind, reason=reason, message=message, node=self.node)
        try:
            await self.api.create(f"/api/v1/namespaces/{ref.namespace}/events", body)
        except ApiError as exc:
            log.warning(
                "could not write Event", extra={"pod": f"{ref.namespace}/{ref.name}", "error": str(exc)}
            )


class EventApi(Protocol):
    """The two calls the recorder makes (``Api`` has them)."""

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


class Dropped(enum.Enum):
    """Why an Event was not written."""

    QUEUE_FULL = "queue_full"  # the recorder's queue held its maximum of distinct Events
    WRITE_FAILED = "write_failed"  # the API server refused it or did not answer in time
    STOPPED = "stopped"  # recorded after stop(), or still queued when stop() gave up


@dataclass(frozen=True, slots=True)
class EventKey:
    """What makes two Events the same (client-go's event key, less the fixed source): the
    object, type, reason and message. Not the pod's resourceVersion, which every patch changes."""

    namespace: str
    name: str
    uid: str
    kind: str
    reason: str
    message: str


@dataclass(slots=True)
class _Pending:
    ref: PodRef
    count: int  # occurrences recorded and not yet written
    first: str
    last: str


@dataclass(slots=True)
class _Series:
    name: str  # the Event object on the server
    count: int  # what its count says
    written_at: float  # monotonic time of the last write


class EventRecorder:
    """Events written in the background.

    ``record`` returns at once: it queues the Event, or counts one more occurrence of the same
    Event already queued, or, with ``capacity`` distinct Events queued, drops it: ``on_drop`` is
    called with the reason (a ``Dropped`` value) and the number of occurrences lost.
    One sender task writes them in order. An Event whose series (same ``EventKey``) was written
    less than ``window`` seconds ago is folded into it with a PATCH of ``count`` and
    ``lastTimestamp``, as client-go's EventCorrelator and the API's Event series do; otherwise
    (or when that Event has expired from the server) it is POSTed anew. Each write is bounded by
    ``write_timeout``; a failed one is logged and dropped, never retried.
    """

    def __init__(
        self,
        api: EventApi,
        node: str,
        *,
        capacity: int = 1000,
        window: float = 600.0,
        write_timeout: float = 10.0,
        max_series: int = 4096,
        on_drop: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stamp: Callable[[], str] = now_rfc3339,
    ) -> None:
        if capacity < 1 or max_series < 1:
            raise ValueError("capacity and max_series must be at least 1")
        self.api = api
        self.node = node
        self.capacity = capacity
        self.window = window
        self.write_timeout = write_timeout
        self.max_series = max_series
        self._on_drop = on_drop or (lambda reason, count: None)
        self._clock = clock
        self._stamp = stamp
        self._pending: OrderedDict[EventKey, _Pending] = OrderedDict()
        self._series: OrderedDict[EventKey, _Series] = OrderedDict()  # LRU, max_series entries
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.dropped: dict[Dropped, int] = dict.fromkeys(Dropped, 0)

    def __len__(self) -> int:
        """Distinct Events waiting to be written."""
        return len(self._pending)

    def record(self, ref: PodRef, *, kind: EventType, reason: str, message: str) -> bool:
        """Queue an Event about ``ref``; never waits. False when it was dropped."""
        if self._stopped:
            self._drop(Dropped.STOPPED)
            return False
        text = sanitize_message(message)
        key = EventKey(ref.namespace, ref.name, ref.uid, kind, reason, text)
        now = self._stamp()
        pending = self._pending.get(key)
        if pending is not None:
            pending.count += 1
            pending.last = now
            pending.ref = ref
            return True
        if len(self._pending) >= self.capacity:
            self._drop(Dropped.QUEUE_FULL)
            return False
        self._pending[key] = _Pending(ref, 1, now, now)
        self._wake.set()
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="events")

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what can be written within ``timeout`` seconds, then give up on the rest."""
        self._stopped = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for pending in self._pending.values():
            self._drop(Dropped.STOPPED, pending.count)
        self._pending.clear()

    def _drop(self, reason: Dropped, count: int = 1) -> None:
        self.dropped[reason] += count
        self._on_drop(reason.value, count)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._stopped:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            key, pending = self._pending.popitem(last=False)
            try:
                await self._write(key, pending)
            except asyncio.CancelledError:
                self._drop(Dropped.STOPPED, pending.count)
                raise
            except Exception as exc:  # the API said no, or a bug: one Event lost, the sender lives
                self._drop(Dropped.WRITE_FAILED, pending.count)
                log.warning(
                    "could not write Event",
                    extra={"pod": f"{key.namespace}/{key.name}", "reason": key.reason, "error": str(exc)},
                )

    async def _write(self, key: EventKey, pending: _Pending) -> None:
        series = self._series.get(key)
        if series is not None and self._clock() - series.written_at < self.window:
            path = f"/api/v1/namespaces/{key.namespace}/events/{series.name}"
            patch = event_series_patch(count=series.count + pending.count, last=pending.last)
            try:
                async with asyncio.timeout(self.write_timeout):
                    await self.api.merge_patch(path, patch)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # Expired from the server (its event TTL) or deleted: start a new series.
            else:
                series.count += pending.count
                series.written_at = self._clock()
                self._series.move_to_end(key)
                return
        body = event_body(
            pending.ref,
            kind=key.kind,
            reason=key.reason,
            message=key.message,
            node=self.node,
            count=pending.count,
            first=pending.first,
            last=pending.last,
        )
        async with asyncio.timeout(self.write_timeout):
            created = await self.api.create(f"/api/v1/namespaces/{key.namespace}/events", body)
        name = as_mapping(as_mapping(created).get("metadata")).get("name")
        if not isinstance(name, str) or not name:
            self._series.pop(key, None)
            return
        self._series[key] = _Series(name, pending.count, self._clock())
        self._series.move_to_end(key)
        while len(self._series) > self.max_series:
            self._series.popitem(last=False)
