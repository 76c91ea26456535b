"""Events off the reconcile path: ``record`` never waits for the API server, the queue is bounded,
repeats become one Event with a count, and ``stop`` flushes what it can in its time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from istio_pod_network_controller.cluster.api import ApiError
from istio_pod_network_controller.cluster.report import (
    COMPONENT,
    MAX_MESSAGE,
    Dropped,
    EventRecorder,
    PodRef,
    event_body,
    sanitize_message,
)

POD = PodRef("ns", "web-1", "uid-1", "10")


class FakeEventApi:
    """Stores Events as the API server would (generateName, merge patch, 404 when gone)."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.gate: asyncio.Event | None = None  # when set, writes wait for it
        self.fail_next: ApiError | None = None
        self._serial = 0

    async def _maybe_wait_or_fail(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("POST", path, dict(body)))
        await self._maybe_wait_or_fail()
        self._serial += 1
        name = f"{body['metadata']['generateName']}{self._serial:x}"
        stored = {**body, "metadata": {**body["metadata"], "name": name}}
        self.events[name] = stored
        return stored

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("PATCH", path, dict(body)))
        await self._maybe_wait_or_fail()
        name = path.rsplit("/", 1)[1]
        if name not in self.events:
            raise ApiError(404, f'events "{name}" not found')
        self.events[name].update(body)
        return self.events[name]


class Stamps:
    """Wall-clock stamps t0, t1, ... in the order they are taken."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"t{self.n}"


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def recorder(api: FakeEventApi, **kwargs: Any) -> EventRecorder:
    return EventRecorder(api, "node-a", stamp=Stamps(), **kwargs)


def test_record_is_a_plain_call_not_a_coroutine() -> None:
    assert not inspect.iscoroutinefunction(EventRecorder.record)


async def test_record_returns_while_the_api_hangs_and_the_queue_stays_bounded() -> None:
    api = FakeEventApi()
    api.gate = asyncio.Event()  # never opened: the API server does not answer
    drops: list[tuple[str, int]] = []
    events = recorder(api, capacity=1000, on_drop=lambda reason, count: drops.append((reason, count)))
    events.start()
    assert events.record(POD, kind="Normal", reason="Initialized", message="m-0")
    await until(lambda: len(api.calls) == 1)  # the sender holds m-0 and waits
    for i in range(1, 1001):
        assert events.record(POD, kind="Normal", reason="Initialized", message=f"m-{i}")
    assert len(events) == 1000
    assert not events.record(POD, kind="Normal", reason="Initialized", message="one too many")
    assert drops == [("queue_full", 1)]
    assert events.record(POD, kind="Normal", reason="Initialized", message="m-5")  # a repeat still fits
    await events.stop(timeout=0.05)
    # The 1,000 queued (one of them twice) and the one in the sender's hands are lost.
    assert events.dropped[Dropped.STOPPED] == 1002
    assert events.dropped[Dropped.QUEUE_FULL] == 1
    assert len(api.calls) == 1


async def test_repeats_while_queued_become_one_event_with_their_count() -> None:
    api = FakeEventApi()
    events = recorder(api)
    for _ in range(5):
        events.record(POD, kind="Warning", reason="ApplyFailed", message="verify: rule missing")
    events.start()
    await events.stop(timeout=2)
    assert [method for method, _, _ in api.calls] == ["POST"]
    (event,) = api.events.values()
    assert event["count"] == 5
    assert (event["firstTimestamp"], event["lastTimestamp"]) == ("t1", "t5")
    assert event["involvedObject"]["uid"] == "uid-1"
    assert event["source"] == {"component": COMPONENT, "host": "node-a"}


async def test_a_repeat_after_the_event_was_written_patches_its_count() -> None:
    api = FakeEventApi()
    events = recorder(api)
    events.start()
    events.record(POD, kind="Warning", reason="ApplyFailed", message="boom")
    await until(lambda: len(api.events) == 1)
    for _ in range(3):
        events.record(POD, kind="Warning", reason="ApplyFailed", message="boom")
    await events.stop(timeout=2)
    assert [method for method, _, _ in api.calls] == ["POST", "PATCH"]
    (name, event) = next(iter(api.events.items()))
    assert api.calls[1][1] == f"/api/v1/namespaces/ns/events/{name}"
    assert api.calls[1][2] == {"count": 4, "lastTimestamp": "t4"}
    assert (event["count"], event["firstTimestamp"], event["lastTimestamp"]) == (4, "t1", "t4")


async def test_a_new_resource_version_of_the_pod_is_still_the_same_event() -> None:
    api = FakeEventApi()
    events = recorder(api)
    events.record(POD, kind="Normal", reason="Initialized", message="ok")
    events.record(PodRef("ns", "web-1", "uid-1", "11"), kind="Normal", reason="Initialized", message="ok")
    events.start()
    await events.stop(timeout=2)
    (event,) = api.events.values()
    assert event["count"] == 2


async def test_a_repeat_after_the_window_starts_a_new_event() -> None:
    api = FakeEventApi()
    now = [0.0]
    events = recorder(api, window=600.0, clock=lambda: now[0])
    events.start()
    events.record(POD, kind="Warning", reason="ApplyFailed", message="boom")
    await until(lambda: len(api.events) == 1)
    now[0] += 601.0
    events.record(POD, kind="Warning", reason="ApplyFailed", message="boom")
    await events.stop(timeout=2)
    assert [method for method, _, _ in api.calls] == ["POST", "POST"]
    assert [event["count"] for event in api.events.values()] == [1, 1]


async def test_an_event_gone_from_the_server_is_written_again() -> None:
    api = FakeEventApi()
    events = recorder(api)
    events.start()
    events.record(POD, kind="Warning", reason="ApplyFailed", message="boom")
    await until(lambda: len(api.events) == 1)
    api.events.clear()  # its TTL ran out
    events.record(POD, kind="Warning", reason="ApplyFailed", message="boom")
    await events.stop(timeout=2)
    assert [method for method, _, _ in api.calls] == ["POST", "PATCH", "POST"]
    (event,) = api.events.values()
    assert event["count"] == 1
    assert events.dropped[Dropped.WRITE_FAILED] == 0


async def test_different_objects_reasons_or_messages_are_different_events() -> None:
    api = FakeEventApi()
    events = recorder(api)
    events.record(POD, kind="Warning", reason="ApplyFailed", message="a")
    events.record(POD, kind="Warning", reason="ApplyFailed", message="b")
    events.record(POD, kind="Warning", reason="InvalidConfiguration", message="a")
    events.record(PodRef("ns", "web-1", "uid-2"), kind="Warning", reason="ApplyFailed", message="a")
    events.start()
    await events.stop(timeout=2)
    assert len(api.events) == 4
    assert all(event["count"] == 1 for event in api.events.values())


async def test_a_refused_write_is_dropped_and_the_sender_goes_on() -> None:
    api = FakeEventApi()
    api.fail_next = ApiError(403, "forbidden")
    drops: list[tuple[str, int]] = []
    events = recorder(api, on_drop=lambda reason, count: drops.append((reason, count)))
    events.record(POD, kind="Warning", reason="ApplyFailed", message="first")
    events.record(POD, kind="Warning", reason="ApplyFailed", message="first")
    events.record(POD, kind="Normal", reason="Initialized", message="second")
    events.start()
    await events.stop(timeout=2)
    assert drops == [("write_failed", 2)]
    assert [event["message"] for event in api.events.values()] == ["second"]


async def test_a_write_that_hangs_is_abandoned_after_the_write_timeout() -> None:
    api = FakeEventApi()
    api.gate = asyncio.Event()
    events = recorder(api, write_timeout=0.02)
    events.record(POD, kind="Warning", reason="ApplyFailed", message="hangs")
    events.start()
    await until(lambda: events.dropped[Dropped.WRITE_FAILED] == 1)
    api.gate.set()
    events.record(POD, kind="Normal", reason="Initialized", message="answered")
    await events.stop(timeout=2)
    assert [event["message"] for event in api.events.values()] == ["answered"]


async def test_stop_flushes_the_queue_and_later_records_are_dropped() -> None:
    api = FakeEventApi()
    events = recorder(api)
    events.start()
    for i in range(3):
        events.record(POD, kind="Normal", reason="Initialized", message=f"m{i}")
    await events.stop(timeout=2)
    assert sorted(event["message"] for event in api.events.values()) == ["m0", "m1", "m2"]
    assert sum(events.dropped.values()) == 0
    assert not events.record(POD, kind="Normal", reason="Initialized", message="late")
    assert events.dropped[Dropped.STOPPED] == 1


async def test_stop_without_start_drops_the_queue() -> None:
    events = recorder(FakeEventApi())
    events.record(POD, kind="Normal", reason="Initialized", message="never sent")
    await events.stop(timeout=0.01)
    assert events.dropped[Dropped.STOPPED] == 1
    assert len(events) == 0


# -- messages ----------------------------------------------------------------------------------


def test_message_becomes_one_line_without_control_characters() -> None:
    hostile = "bad value '1\nWarning  Forged  fake line'\r\n\tend\u2028more\x1b[31m\u202eevil\x00"
    clean = sanitize_message(hostile)
    assert clean == "bad value '1 Warning Forged fake line' end more[31mevil"
    assert clean.isprintable()


def test_long_message_is_cut_to_the_maximum_with_a_mark() -> None:
    clean = sanitize_message("x" * 10_000)
    assert len(clean) == MAX_MESSAGE
    assert clean.endswith("\u2026")
    assert sanitize_message("y" * MAX_MESSAGE) == "y" * MAX_MESSAGE


async def test_repeats_are_matched_on_the_sanitized_message() -> None:
    api = FakeEventApi()
    events = recorder(api)
    events.record(POD, kind="Warning", reason="ApplyFailed", message="a\nb")
    events.record(POD, kind="Warning", reason="ApplyFailed", message="a  b")
    events.start()
    await events.stop(timeout=2)
    (event,) = api.events.values()
    assert (event["message"], event["count"]) == ("a b", 2)


def test_event_body_sanitizes_too() -> None:
    body = event_body(POD, kind="Warning", reason="R", message="two\nlines", node="n")
    assert body["message"] == "two lines"
    assert body["count"] == 1
    assert body["firstTimestamp"] == body["lastTimestamp"]


def test_recorder_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventRecorder(FakeEventApi(), "n", capacity=0)
    with pytest.raises(ValueError, match="at least 1"):
        EventRecorder(FakeEventApi(), "n", max_series=0)


def test_a_detail_nested_past_the_bound_reads_as_no_detail() -> None:
    from istio_pod_network_controller import names as n
    from istio_pod_network_controller.cluster.report import read_detail
    from istio_pod_network_controller.podfacts import pod_facts

    deep = "[" * 100_000 + "]" * 100_000
    assert read_detail(pod_facts({"metadata": {"annotations": {n.DETAIL: deep}}})) == {}
    detail = pod_facts({"metadata": {"annotations": {n.DETAIL: '{"netnsInode": 5}'}}})
    assert read_detail(detail) == {"netnsInode": 5}
