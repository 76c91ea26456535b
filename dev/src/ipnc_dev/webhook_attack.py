"""A hostile client of the webhook, for the hardening tests: idle TLS connections, header dribble,
bodies at the size cap, nested and garbage bodies, huge but valid pods, and a timed normal
admission request to compare with.

Loopback only, and every loop is bounded in count and in time: each attack stops when its
``stop`` event is set or its own deadline passes, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
OPT_IN = "istio-pod-network-controller/initialize"
NORMAL_UID = "00000000-0000-4000-8000-000000000001"
# Never longer than the API server waits for a webhook (timeoutSeconds' largest default).
API_SERVER_BUDGET = 10.0
ATTACK_DEADLINE = 120.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# What a client sees when the server closes on it (or it gives up).
_CLIENT_ERRORS = (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, ValueError)


def raise_open_files(at_least: int) -> int:
    """Raise this process's soft open-files limit to at least ``at_least`` (up to the hard
    limit); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = at_least if hard == resource.RLIM_INFINITY else min(at_least, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


# -- bodies ------------------------------------------------------------------------------------------


def review(obj: dict[str, Any] | None, *, uid: str = NORMAL_UID, namespace: str = "shop") -> bytes:
    request = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": namespace,
        "object": obj,
    }
    doc = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    return json.dumps(doc).encode()


def meshed_pod(*, istio_init: list[str] | None = None, name: str = "web") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}
    if istio_init is not None:
        spec["initContainers"] = [{"name": "istio-init", "args": istio_init}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {OPT_IN: "true"}},
        "spec": spec,
    }


NORMAL_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*"]


def normal_review() -> bytes:
    """What the API server sends for an ordinary Istio-injected pod."""
    return review(meshed_pod(istio_init=NORMAL_ARGS))


def many_args_review(repeats: int) -> bytes:
    """The reported attack: istio-init's args repeating ``-d 1`` (24,000 times: about 270 KB)."""
    return review(meshed_pod(istio_init=["istio-iptables", *(["-d", "1"] * repeats)]), uid="many-args")


def padded_review(size: int) -> bytes:
    """A valid AdmissionReview of exactly ``size`` bytes (a long annotation), for the size cap."""
    pod = meshed_pod()
    base = review(pod, uid="padded")
    pod["metadata"]["annotations"]["pad"] = "x" * max(0, size - len(base) - len(', "pad": ""'))
    body = review(pod, uid="padded")
    return body + b" " * max(0, size - len(body))


def nested_body(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# -- one exchange --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exchange:
    status: int
    body: bytes
    seconds: float


async def _connect(port: int, ctx: ssl.SSLContext) -> Connection:
    return await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


async def exchange(
    port: int,
    ctx: ssl.SSLContext,
    body: bytes,
    *,
    path: str = "/mutate",
    content_type: str = "application/json",
    timeout: float = API_SERVER_BUDGET,
) -> Exchange:
    """One POST on a new connection, timed from connect to the last byte of the answer; raises
    TimeoutError past ``timeout`` (the API server's budget by default)."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        reader, writer = await _connect(port, ctx)
        try:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: webhook\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            status, answer = await read_response(reader)
        finally:
            _close(writer)
    return Exchange(status, answer, time.monotonic() - started)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return int(lines[0].split()[1]), await reader.readexactly(int(headers.get("content-length", "0")))


def admitted(answer: Exchange) -> bool:
    """A 200 AdmissionReview that allows the normal pod with a patch."""
    if answer.status != 200:
        return False
    response = json.loads(answer.body)["response"]
    return response["uid"] == NORMAL_UID and response["allowed"] is True and bool(response.get("patch"))


# -- idle connections ------------------------------------------------------------------------------------


async def open_idle(port: int, ctx: ssl.SSLContext, count: int, *, concurrency: int = 32) -> list[Connection]:
    """``count`` TLS connections with the handshake done and nothing sent (fewer if the server
    closes some while they open)."""
    opened: list[Connection] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(30):
                    opened.append(await _connect(port, ctx))

    await asyncio.gather(*(one() for _ in range(count)))
    return opened


async def closed_after(conns: list[Connection], opened_at: float, timeout: float) -> list[float | None]:
    """Seconds from ``opened_at`` until the server closed each connection (None: still open
    after ``timeout``)."""

    async def one(conn: Connection) -> float | None:
        reader, writer = conn
        try:
            async with asyncio.timeout(max(0.0, opened_at + timeout - time.monotonic())):
                while await reader.read(4096):
                    pass
        except TimeoutError:
            return None
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            _close(writer)
        return time.monotonic() - opened_at

    return list(await asyncio.gather(*(one(c) for c in conns)))


def close_all(conns: list[Connection]) -> None:
    for _, writer in conns:
        _close(writer)


# -- the attacker ---------------------------------------------------------------------------------------


@dataclass
class AttackCounts:
    sent: dict[str, int] = field(default_factory=dict)
    answers: dict[str, dict[int, int]] = field(default_factory=dict)

    def note(self, kind: str, status: int | None) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + 1
        if status is not None:
            by_status = self.answers.setdefault(kind, {})
            by_status[status] = by_status.get(status, 0) + 1


async def _repeat(
    stop: asyncio.Event, counts: AttackCounts, kind: str, once: Callable[[], Awaitable[int | None]]
) -> None:
    deadline = time.monotonic() + ATTACK_DEADLINE
    while not stop.is_set() and time.monotonic() < deadline:
        status: int | None = None
        with contextlib.suppress(*_CLIENT_ERRORS):
            status = await once()
        counts.note(kind, status)
        await asyncio.sleep(0)


async def _dribble(port: int, ctx: ssl.SSLContext, stop: asyncio.Event, interval: float) -> int | None:
    """Slow loris: a request header one byte at a time, until the server closes it."""
    reader, writer = await _connect(port, ctx)
    try:
        text = b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nX-Slow: " + b"a" * 100_000
        for byte in text:
            if stop.is_set() or reader.at_eof():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval)
        return None
    finally:
        _close(writer)


async def _slow_body(
    port: int, ctx: ssl.SSLContext, stop: asyncio.Event, size: int, interval: float
) -> int | None:
    """A body announced at ``size`` bytes, its first 256 KiB at once and then a byte at a time: it
    holds the server's body budget, and its buffers, for as long as the server lets it."""
    reader, writer = await _connect(port, ctx)
    try:
        head = (
            "POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + b'{"pad": "' + b"x" * min(256 * 1024, size // 2))
        await writer.drain()
        for _ in range(size):
            if stop.is_set() or reader.at_eof():
                break
            writer.write(b"x")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    status, _ = await read_response(reader)
                    return status
        return None
    finally:
        _close(writer)


async def attack(port: int, ctx: ssl.SSLContext, stop: asyncio.Event, *, max_bytes: int) -> AttackCounts:
    """The worst requests we can build, sent concurrently until ``stop``: bodies at the size cap,
    deeply nested bodies, garbage, the reported many-args pod, header dribblers, bodies announced
    at the cap and dribbled, and connections held idle (reopened as the server closes them)."""
    counts = AttackCounts()
    at_cap = padded_review(max_bytes)
    nested = nested_body(10_000)
    many_args = many_args_review(24_000)

    def post(body: bytes) -> Callable[[], Awaitable[int | None]]:
        async def once() -> int | None:
            return (await exchange(port, ctx, body, timeout=30)).status

        return once

    async def dribble() -> int | None:
        return await _dribble(port, ctx, stop, 0.05)

    async def slow_body() -> int | None:
        return await _slow_body(port, ctx, stop, max_bytes, 0.1)

    async def hold_idle() -> int | None:
        conns = await open_idle(port, ctx, 50)
        try:
            await closed_after(conns, time.monotonic(), 30)
        finally:
            close_all(conns)
        return None

    workers = [
        *(_repeat(stop, counts, "at-cap", post(at_cap)) for _ in range(4)),
        *(_repeat(stop, counts, "nested", post(nested)) for _ in range(2)),
        _repeat(stop, counts, "garbage", post(b"\xff" * 100_000)),
        *(_repeat(stop, counts, "many-args", post(many_args)) for _ in range(4)),
        *(_repeat(stop, counts, "dribble", dribble) for _ in range(20)),
        *(_repeat(stop, counts, "slow-body", slow_body) for _ in range(8)),
        *(_repeat(stop, counts, "idle", hold_idle) for _ in range(4)),
    ]
    await asyncio.gather(*workers)
    return counts


async def hold_idle(
    port: int, ctx: ssl.SSLContext, count: int, stop: Callable[[], bool], *, deadline: float = ATTACK_DEADLINE
) -> AttackCounts:
    """Keep ``count`` idle TLS connections open (handshake done, nothing sent), opening new ones
    as the server closes them, until ``stop()`` says so or ``deadline`` seconds pass. For a
    caller on another thread (``stop`` is polled)."""
    counts = AttackCounts()
    held: set[asyncio.Task[None]] = set()
    ends = time.monotonic() + deadline
    connecting = asyncio.Semaphore(32)

    async def one() -> None:
        try:
            async with connecting, asyncio.timeout(max(0.0, ends - time.monotonic())):
                reader, writer = await _connect(port, ctx)
        except (*_CLIENT_ERRORS, asyncio.CancelledError):
            counts.note("idle-refused", None)
            return
        counts.note("idle", None)
        try:
            while not stop() and time.monotonic() < ends:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        if not await reader.read(4096):
                            counts.note("idle-closed-by-server", None)
                            return
        except _CLIENT_ERRORS:
            counts.note("idle-closed-by-server", None)
        finally:
            _close(writer)

    while not stop() and time.monotonic() < ends:
        while len(held) < count and not stop():
            task = asyncio.create_task(one())
            held.add(task)
            task.add_done_callback(held.discard)
        await asyncio.sleep(0.05)
    await asyncio.gather(*held, return_exceptions=True)
    return counts
