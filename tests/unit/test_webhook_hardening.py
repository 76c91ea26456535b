"""Bounded cost: no client of the webhook's port can stall it for the API server.

In-process servers with short timeouts and small caps, real TLS on loopback: idle and dribbling
connections are closed, the cap closes the least recently active idle connection for a new one,
hostile bodies get a 4xx and one log line, the decision runs off the event loop under a deadline,
and any unexpected error is one log line and a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev import webhook_attack as attack
from ipnc_dev.webhook_tls import make_serving_pair
from istio_pod_network_controller import webhook
from istio_pod_network_controller.inject import WaiterSettings
from istio_pod_network_controller.webhook import (
    ByteBudget,
    CachedNamespaces,
    Limits,
    NamespaceLookupError,
    TlsFiles,
    WebhookServer,
    WorkerLane,
    connection_cap,
    raise_open_files_limit,
)

SETTINGS = WaiterSettings(image="registry.example/ipnc:1.0")
WEBHOOK_LOGGER = "istio_pod_network_controller.webhook"


class BlockingNamespaces:
    """Namespace reads that wait until released (requests stay in flight meanwhile)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def get(self, name: str) -> dict[str, Any] | None:
        self.waiting += 1
        await self.release.wait()
        return {"metadata": {"name": name, "labels": {attack.OPT_IN: "true"}}}


@dataclass
class Served:
    server: WebhookServer
    ctx: ssl.SSLContext

    @property
    def port(self) -> int:
        return self.server.port

    async def post(self, body: bytes, **kwargs: Any) -> attack.Exchange:
        return await attack.exchange(self.port, self.ctx, body, **kwargs)

    async def raw(self, data: bytes, *, timeout: float = 10) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ctx, server_hostname="127.0.0.1"
        )
        try:
            writer.write(data)
            await writer.drain()
            async with asyncio.timeout(timeout):
                return await attack.read_response(reader)
        finally:
            writer.close()


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    started: list[WebhookServer] = []
    pair = make_serving_pair()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pair.write(cert, key)
    ctx = ssl.create_default_context(cadata=pair.ca.pem.decode())

    async def start(namespaces: Any = None, **limits: Any) -> Served:
        server = WebhookServer(
            SETTINGS, namespaces or webhook.NoNamespaces(), TlsFiles(str(cert), str(key)),
            host="127.0.0.1", port=0, limits=Limits(**limits),
        )  # fmt: skip
        await server.start()
        started.append(server)
        return Served(server, ctx)

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.INFO]


# -- timeouts ------------------------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_the_read_timeout(serve: Serve) -> None:
    served = await serve(read_timeout=0.5, idle_timeout=30)
    opened = time.monotonic()
    conns = await attack.open_idle(served.port, served.ctx, 5)
    assert len(conns) == 5
    closed = await attack.closed_after(conns, opened, 10)
    assert all(t is not None and t >= 0.45 for t in closed), closed
    await until(lambda: len(served.server.connections) == 0)
    assert served.server.stats.closed_slow == 5


async def test_a_dribbled_header_is_closed_after_the_read_timeout_though_bytes_keep_coming(
    serve: Serve,
) -> None:
    served = await serve(read_timeout=0.6)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=served.ctx, server_hostname="127.0.0.1"
    )
    started = time.monotonic()
    with contextlib.suppress(OSError, ssl.SSLError):
        for byte in b"POST /mutate HTTP/1.1\r\nHost: w\r\nX-Slow: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof() or time.monotonic() - started > 10:
                break
    assert reader.at_eof()
    assert 0.55 <= time.monotonic() - started < 10
    writer.close()


async def test_a_slow_body_gets_408_within_the_read_timeout(serve: Serve) -> None:
    served = await serve(read_timeout=0.5)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=served.ctx, server_hostname="127.0.0.1"
    )
    writer.write(
        b"POST /mutate HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    async with asyncio.timeout(10):
        status, body = await attack.read_response(reader)
    assert status == 408 and b"not received within 0.5 s" in body
    writer.close()


async def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(serve: Serve) -> None:
    served = await serve(idle_timeout=0.5, read_timeout=5)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=served.ctx, server_hostname="127.0.0.1"
    )
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n")
    assert await attack.read_response(reader) == (200, b"ok\n")
    answered = time.monotonic()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    assert time.monotonic() - answered >= 0.45
    assert served.server.stats.closed_idle == 1
    writer.close()


async def test_a_stalled_tls_handshake_is_closed_after_its_timeout(serve: Serve) -> None:
    served = await serve(tls_handshake_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)  # no TLS: never says hello
    started = time.monotonic()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    assert time.monotonic() - started >= 0.45
    await until(lambda: len(served.server.connections) == 0)
    assert served.server.stats.handshake_failed == 1
    writer.close()


async def test_a_request_head_over_16_kib_is_answered_431_and_closed(serve: Serve) -> None:
    served = await serve()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=served.ctx, server_hostname="127.0.0.1"
    )
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(5))  # each within aiohttp's
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: w\r\n" + fields + b"\r\n")
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.drain()
    async with asyncio.timeout(10):
        assert await attack.read_response(reader) == (431, b"request head over 16384 bytes\n")
        assert await reader.read() == b""
    writer.close()
    assert served.server.stats.closed_large_head == 1


async def test_a_head_within_the_limits_is_served_again_and_again(serve: Serve) -> None:
    served = await serve()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=served.ctx, server_hostname="127.0.0.1"
    )
    token = b"Authorization: Bearer " + b"t" * 4000 + b"\r\n"
    for _ in range(10):  # 40 KiB of heads on one kept-alive connection: each is counted alone
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: w\r\n" + token + b"\r\n")
        assert await attack.read_response(reader) == (200, b"ok\n")
    writer.close()
    assert served.server.stats.closed_large_head == 0


# -- the connection cap ---------------------------------------------------------------------------------


async def test_at_the_cap_the_least_recently_active_idle_connection_gives_way(serve: Serve) -> None:
    served = await serve(max_connections=5, read_timeout=30)
    opened = time.monotonic()
    idle = await attack.open_idle(served.port, served.ctx, 5, concurrency=1)
    assert len(idle) == 5 and len(served.server.connections) == 5
    answer = await served.post(attack.normal_review())
    assert attack.admitted(answer)
    first = await attack.closed_after(idle[:1], opened, 5)
    assert first[0] is not None  # the oldest idle connection was closed for the new one
    assert served.server.stats.evicted == 1
    still = await attack.closed_after(idle[1:], time.monotonic(), 0.2)
    assert still == [None] * 4  # the others were left alone


async def test_at_the_cap_with_every_connection_busy_the_new_one_is_refused(serve: Serve) -> None:
    namespaces = BlockingNamespaces()
    served = await serve(namespaces, max_connections=2)
    not_opted = json.loads(attack.normal_review())
    del not_opted["request"]["object"]["metadata"]["annotations"]
    body = json.dumps(not_opted).encode()
    pending = [asyncio.create_task(served.post(body)) for _ in range(2)]
    await until(lambda: namespaces.waiting == 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # closed at once, before its handshake
    writer.close()
    assert served.server.stats.refused == 1
    namespaces.release.set()
    for task in pending:
        assert (await task).status == 200


def test_the_cap_stays_below_the_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert connection_cap(1000) == 256 - webhook.FD_RESERVE
        assert connection_cap(100) == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised = raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised > 256
        assert hard == resource.RLIM_INFINITY or raised == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- hostile bodies: a 4xx and one log line ---------------------------------------------------------------

GARBAGE = [
    ("nested-10000", attack.nested_body(10_000), 400, "nested 10000 levels deep"),
    ("nested-arrays", b"[" * 10_000 + b"]" * 10_000, 400, "nested 10000 levels deep"),
    ("nested-in-pod", attack.review({"spec": attack.json.loads(attack.nested_body(100))}), 400, "nested"),
    ("not-json", b"{this is not json", 400, "not JSON"),
    ("binary", b"\xff\x00" * 5000, 400, "not JSON"),
    ("many-objects", b"[" + b"{}," * 300_000 + b"{}]", 400, "JSON values, more than 250000"),
    ("many-numbers", b"[" + b"1.5," * 300_000 + b"1]", 400, "JSON values, more than 250000"),
    ("bad-namespace", attack.review({"metadata": {}, "spec": {"containers": [{"name": "istio-proxy"}]}},
                                    namespace="../../secrets"), 400, "not a namespace name"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "message"), [g[1:] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
async def test_hostile_bodies_get_a_4xx_and_exactly_one_log_line(
    serve: Serve, caplog: pytest.LogCaptureFixture, body: bytes, status: int, message: str
) -> None:
    served = await serve()
    caplog.set_level(logging.INFO)
    caplog.clear()
    answer = await served.post(body)
    assert (answer.status, message in answer.body.decode()) == (status, True), answer
    lines = records(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].exc_info is None and "Traceback" not in caplog.text
    assert attack.admitted(await served.post(attack.normal_review()))


HTTP_GARBAGE = [
    ("header-too-long", b"GET /healthz HTTP/1.1\r\nHost: w\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"),
    ("bad-chunked", b"POST /mutate HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    ("second-request-garbage", b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n\x00\x01\x02 garbage\r\n\r\n"),
]  # fmt: skip


@pytest.mark.parametrize("data", [g[1] for g in HTTP_GARBAGE], ids=[g[0] for g in HTTP_GARBAGE])
async def test_bad_http_is_at_most_one_log_line_without_a_traceback(
    serve: Serve, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    served = await serve()
    caplog.set_level(logging.INFO)
    caplog.clear()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=served.ctx, server_hostname="127.0.0.1"
    )
    writer.write(data)
    await writer.drain()
    with contextlib.suppress(OSError, ssl.SSLError):
        async with asyncio.timeout(10):
            seen = await reader.read()  # until the server closes
    writer.close()
    assert seen.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), seen[:200]
    lines = records(caplog)
    assert len(lines) <= 1, [r.getMessage() for r in lines]
    assert all(r.exc_info is None for r in lines) and "Traceback" not in caplog.text
    assert attack.admitted(await served.post(attack.normal_review()))


async def test_a_body_over_the_cap_is_refused_before_it_is_read(serve: Serve) -> None:
    served = await serve(max_request_bytes=64 * 1024)
    status, body = await served.raw(
        b"POST /mutate HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
        b"Content-Length: 65537\r\nConnection: close\r\n\r\n"
    )
    assert status == 413 and b"larger than 65536" in body
    assert (await served.post(attack.padded_review(64 * 1024))).status == 200


# -- the decision: off the loop, under a deadline -----------------------------------------------------------


async def test_the_decision_runs_off_the_event_loop(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = webhook.mutate_pod

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(webhook, "mutate_pod", recording)
    served = await serve()
    assert attack.admitted(await served.post(attack.normal_review()))
    assert threads and threads[0] is not threading.main_thread()
    assert threads[0].name.startswith("ipnc-webhook-worker")


async def test_a_decision_past_the_request_timeout_is_a_500_and_the_server_goes_on(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = webhook.mutate_pod
    slow = threading.Event()

    def stalling(*args: Any) -> Any:
        if not slow.is_set():
            slow.set()
            time.sleep(1.0)
        return real(*args)

    monkeypatch.setattr(webhook, "mutate_pod", stalling)
    served = await serve(request_timeout=0.3)
    caplog.set_level(logging.INFO)
    answer = await served.post(attack.normal_review())
    assert answer.status == 500 and b"no answer within 0.3 s" in answer.body
    assert answer.seconds < 1.0  # answered at the deadline, not when the work ended
    assert [r.getMessage() for r in records(caplog)] == ["request timed out"]
    await asyncio.sleep(0.8)
    assert attack.admitted(await served.post(attack.normal_review()))
    assert served.server.stats.request_timeouts == 1


async def test_an_unexpected_error_is_one_log_line_and_a_500(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> Any:
        raise KeyError("surprise")

    monkeypatch.setattr(webhook, "mutate_pod", broken)
    served = await serve()
    caplog.set_level(logging.INFO)
    answer = await served.post(attack.normal_review())
    assert answer.status == 500 and answer.body == b"internal error\n"
    lines = records(caplog)
    assert [r.getMessage() for r in lines] == ["request failed"]
    assert lines[0].exc_info is None and "KeyError: 'surprise'" in lines[0].__dict__["error"]


async def test_a_namespace_lookup_past_the_request_timeout_is_a_500(serve: Serve) -> None:
    namespaces = BlockingNamespaces()
    served = await serve(namespaces, request_timeout=0.3)
    not_opted = json.loads(attack.normal_review())
    del not_opted["request"]["object"]["metadata"]["annotations"]
    answer = await served.post(json.dumps(not_opted).encode())
    assert answer.status == 500 and b"failure policy decides" in answer.body
    namespaces.release.set()


# -- the pieces ---------------------------------------------------------------------------------------------


async def test_the_worker_lane_runs_the_cheapest_waiting_job_first() -> None:
    lane = WorkerLane()
    lane.start()
    try:
        gate = threading.Event()
        order: list[int] = []
        first = asyncio.create_task(lane.run(0, gate.wait))
        await asyncio.sleep(0.05)  # the worker is busy with it
        later = [asyncio.create_task(lane.run(cost, lambda c=cost: order.append(c))) for cost in (30, 10, 20)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *later)
        assert order == [10, 20, 30]
    finally:
        lane.close()


async def test_the_worker_lane_skips_a_job_nobody_waits_for_any_more() -> None:
    lane = WorkerLane()
    lane.start()
    try:
        gate = threading.Event()
        ran: list[str] = []
        busy = asyncio.create_task(lane.run(0, gate.wait))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await lane.run(1, lambda: ran.append("late"))
        gate.set()
        await busy
        assert await lane.run(2, lambda: "next") == "next"
        assert ran == []
    finally:
        lane.close()


async def test_the_byte_budget_grants_the_smallest_waiting_request_first() -> None:
    budget = ByteBudget(100)
    order: list[int] = []

    async def take(size: int, hold: asyncio.Event) -> None:
        async with budget.hold(size):
            order.append(size)
            await hold.wait()

    holds = {size: asyncio.Event() for size in (100, 90, 5, 50)}
    first = asyncio.create_task(take(100, holds[100]))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(take(size, holds[size])) for size in (90, 5, 50)]
    await asyncio.sleep(0.01)
    assert order == [100]
    holds[100].set()
    await first
    await asyncio.sleep(0.01)
    assert order == [100, 5, 50]  # 90 does not fit beside them
    holds[5].set()
    holds[50].set()
    holds[90].set()
    await asyncio.gather(*waiting)
    assert order == [100, 5, 50, 90] and budget.used == 0


async def test_a_request_that_gives_up_waiting_for_the_budget_holds_nothing() -> None:
    budget = ByteBudget(10)
    async with budget.hold(10):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                async with budget.hold(5):
                    pass
    assert budget.used == 0
    async with budget.hold(10):
        assert budget.used == 10


async def test_the_namespace_cache_keeps_a_bounded_number_of_names() -> None:
    calls: list[str] = []

    async def fetch(name: str) -> dict[str, Any] | None:
        calls.append(name)
        if name == "broken":
            raise NamespaceLookupError("boom")
        return None

    cache = CachedNamespaces(fetch, ttl=60, max_entries=3)
    for name in ("a", "b", "c", "d"):
        await cache.get(name)
    assert len(cache) == 3
    await cache.get("d")
    await cache.get("a")  # the oldest was dropped: read again
    assert calls == ["a", "b", "c", "d", "a"]
