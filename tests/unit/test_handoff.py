"""The hand-off's message and both of its ends, over real unix sockets (each test its own
abstract name, in this process's namespace)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import select
import socket
import threading

import pytest

from istio_pod_network_controller import names
from istio_pod_network_controller.handoff import (
    FAST_FOR,
    FAST_RETRY,
    MAX_PAYLOAD_BYTES,
    SLOW_RETRY,
    Client,
    HandoffError,
    decode,
    encode,
)
from istio_pod_network_controller.node.handoff import MAX_CONNECTIONS, Handoffs, Opened
from istio_pod_network_controller.node.netns import NetnsId

NETNS = NetnsId(4, 4026532000)


def address() -> bytes:
    return b"\0ipnc-test-" + secrets.token_hex(8).encode()


def listener(at: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.bind(at)
    sock.listen(MAX_CONNECTIONS)
    return sock


def test_a_mark_round_trips_as_the_annotations_it_stands_for() -> None:
    detail = json.dumps({"netnsInode": 7, "rulesetSha256": "ab"})
    assert decode(encode("initialized", detail)) == {names.STATUS: "initialized", names.DETAIL: detail}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"status": "initialized"}',
        b'{"status": "initialized", "detail": "{}", "more": 1}',
        b'{"status": 1, "detail": "{}"}',
        b'{"status": "initialized", "detail": {}}',
        b'{"status": "x", "detail": "' + b"a" * MAX_PAYLOAD_BYTES + b'"}',
    ],
)
def test_anything_else_is_not_a_mark(data: bytes) -> None:
    with pytest.raises(HandoffError):
        decode(data)


def test_a_mark_too_big_to_hand_over_is_refused_by_the_agent() -> None:
    with pytest.raises(HandoffError):
        encode("initialized", "x" * MAX_PAYLOAD_BYTES)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_client_retries_often_at_first_then_seldom_and_never_blocks() -> None:
    clock = Clock()
    client = Client(address(), clock=clock)
    assert client.poll() is None  # nobody listens: refused at once
    assert client.fileno() is None and client.last_problem == ""
    assert client.due_in() == pytest.approx(FAST_RETRY)
    assert client.poll() is None  # not due: no attempt
    clock.now += FAST_FOR + 1
    assert client.poll() is None
    assert client.due_in() == pytest.approx(SLOW_RETRY)
    client.close()


def test_the_client_waits_on_a_held_connection_and_reads_the_mark_when_it_comes() -> None:
    at = address()
    with listener(at) as server:
        client = Client(at)
        assert client.poll() is None
        fd = client.fileno()
        assert fd is not None  # connected: wait on it
        conn, _ = server.accept()
        with conn:
            conn.setblocking(True)
            message = encode("initialized", '{"netnsInode": 1}')
            conn.sendall(message[:10])
            assert client.poll() is None  # half a message: still waiting
            conn.sendall(message[10:])
        assert client.poll() == {names.STATUS: "initialized", names.DETAIL: '{"netnsInode": 1}'}
        assert client.fileno() is None
        client.close()


@pytest.mark.parametrize(
    ("sent", "problem"),
    [
        (b"", "closed the connection without a mark"),
        (b"not json", "not a mark"),
        (b"x" * (MAX_PAYLOAD_BYTES + 10), "over"),
    ],
)
def test_what_is_not_a_mark_is_dropped_with_a_reason(sent: bytes, problem: str) -> None:
    at = address()
    with listener(at) as server:
        client = Client(at)
        client.poll()
        conn, _ = server.accept()

        def send() -> None:
            with conn:
                conn.setblocking(True)
                with contextlib.suppress(OSError):  # the client stops reading past its bound
                    conn.sendall(sent)

        sender = threading.Thread(target=send)
        sender.start()
        found = None
        while (fd := client.fileno()) is not None:
            ready, _, _ = select.select([fd], [], [], 10)
            assert ready, "nothing came"
            found = client.poll()
        sender.join(10)
        assert found is None
        assert problem in client.last_problem
        client.close()


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def opened_at(at: bytes) -> Opened:
    return Opened(listener(at), 12345)


def test_the_agent_holds_a_connection_until_the_mark_then_counts_it_served() -> None:
    at = address()
    results: list[str] = []

    async def scenario() -> None:
        handoffs = Handoffs(on_result=results.append)
        handoffs.open("uid", NETNS, opened_at(at))
        assert handoffs.listening("uid", NETNS) == (12345,)
        assert handoffs.listening("uid", NetnsId(4, 1)) is None
        client = Client(at)
        client.poll()
        await asyncio.sleep(0.1)
        assert client.poll() is None  # held: no mark yet
        assert handoffs.ready("uid", "initialized", "{}")
        assert not handoffs.ready("uid", "initialized", "{}")  # once
        for _ in range(100):
            got = client.poll()
            if got is not None:
                break
            await asyncio.sleep(0.01)
        assert got == {names.STATUS: "initialized", names.DETAIL: "{}"}
        handoffs.close("uid", "waiter_done")
        assert len(handoffs) == 0

    run(scenario())
    assert results == ["served"]


def test_a_listener_nobody_used_expires_and_closes() -> None:
    at = address()
    results: list[str] = []

    async def scenario() -> None:
        handoffs = Handoffs(ttl=0.2, on_result=results.append)
        handoffs.open("uid", NETNS, opened_at(at))
        await asyncio.sleep(0.5)
        assert len(handoffs) == 0
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe, pytest.raises(ConnectionRefusedError):
            probe.connect(at)

    run(scenario())
    assert results == ["expired"]


def test_no_more_listeners_than_the_bound_and_all_closed_on_stop() -> None:
    results: list[str] = []

    async def scenario() -> None:
        handoffs = Handoffs(max_pods=2, on_result=results.append)
        for n in range(2):
            assert handoffs.room()
            handoffs.open(f"uid-{n}", NETNS, opened_at(address()))
        assert not handoffs.room()
        handoffs.open("uid-0", NETNS, opened_at(address()))  # the same pod again: replaced
        assert len(handoffs) == 2
        handoffs.close_all()
        assert len(handoffs) == 0

    run(scenario())
    assert sorted(results) == ["replaced", "stopped", "stopped"]


def test_closing_a_listener_under_its_accept_leaves_the_loop_able_to_use_its_fd_number() -> None:
    """The cancelled accept's reader is removed before the socket is closed: the next socket,
    which gets the same fd number, is woken when its data comes."""

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        handoffs = Handoffs()
        handoffs.open("uid", NETNS, opened_at(address()))
        for _ in range(3):
            await asyncio.sleep(0)  # the accept is waiting
        handoffs.close("uid", "gone")
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            reader = asyncio.ensure_future(loop.sock_recv(a, 1))
            await asyncio.sleep(0.05)
            b.send(b"x")
            return await asyncio.wait_for(reader, 5.0)

    assert asyncio.run(scenario()) == b"x"


def test_a_listener_that_took_every_connection_no_longer_vouches_for_its_cookie() -> None:
    at = address()

    async def scenario() -> None:
        handoffs = Handoffs()
        handoffs.open("uid", NETNS, opened_at(at))
        held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CONNECTIONS)]
        for sock in held:
            sock.setblocking(False)
            sock.connect(at)
        for _ in range(100):
            if handoffs.listening("uid", NETNS) is None:
                break
            await asyncio.sleep(0.01)
        # Closed: the namespace is no longer held by it, a new one could have its inode number.
        assert handoffs.listening("uid", NETNS) is None
        assert len(handoffs) == 1  # the held connections still get the mark
        for sock in held:
            sock.close()
        handoffs.close_all()

    run(scenario())


def test_a_mark_too_big_to_hand_over_closes_the_listener() -> None:
    results: list[str] = []

    async def scenario() -> None:
        handoffs = Handoffs(on_result=results.append)
        handoffs.open("uid", NETNS, opened_at(address()))
        assert not handoffs.ready("uid", "initialized", "x" * MAX_PAYLOAD_BYTES)
        assert len(handoffs) == 0

    run(scenario())
    assert results == ["too_big"]


def test_a_name_refused_is_remembered_for_its_namespace_until_the_pod_goes() -> None:
    results: list[str] = []

    async def scenario() -> None:
        handoffs = Handoffs(on_result=results.append)
        handoffs.open("uid", NETNS, Opened(None, 7, "cannot listen: Address already in use"))
        assert handoffs.refused("uid", NETNS) and not handoffs.refused("uid", NetnsId(4, 1))
        handoffs.close("uid", "gone")
        assert not handoffs.refused("uid", NETNS)

    run(scenario())
    assert results == ["unavailable"]


def test_after_stop_no_listener_is_opened() -> None:
    at = address()

    async def scenario() -> None:
        handoffs = Handoffs()
        handoffs.close_all()
        assert not handoffs.room()
        opened = opened_at(at)
        handoffs.open("uid", NETNS, opened)  # a worker that was in the namespace meanwhile
        assert len(handoffs) == 0
        assert opened.listener is not None and opened.listener.fileno() < 0

    run(scenario())
