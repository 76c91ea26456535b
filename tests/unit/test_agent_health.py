"""Liveness tells the truth: a stalled event loop, a failed start-up and a node call stuck past
the reconcile deadline each turn /healthz red, served from the health server's own thread."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from istio_pod_network_controller.agent import Agent, AgentConfig
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Backend, Family, Tools
from istio_pod_network_controller.observe import HealthServer, Metrics


class NoApi:
    """The agent under test never reaches the API: nothing here starts its watches."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected API call: {name}")


def make_agent(**config: Any) -> Agent:
    tools = Tools(Backend.NFT, {f: "save" for f in Family}, {f: "restore" for f in Family})
    return Agent(AgentConfig(node_name="n1", **config), NoApi(), Applier(tools), Metrics())  # type: ignore[arg-type]


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    runner = LoopThread()
    try:
        yield runner
    finally:
        runner.close()


def healthz(agent: Agent) -> int:
    server = HealthServer(("127.0.0.1", 0), agent.metrics, healthy=agent.healthy, ready=lambda: True)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    finally:
        server.stop()


def test_a_stalled_event_loop_turns_healthz_red_and_recovers(loop: LoopThread) -> None:
    agent = make_agent(stall_seconds=0.3)

    async def begin() -> None:
        agent._tasks.append(asyncio.create_task(agent._heartbeat(), name="heartbeat"))

    loop.run(begin())
    time.sleep(0.1)
    assert agent.health_problem() is None and healthz(agent) == 200

    loop.loop.call_soon_threadsafe(time.sleep, 1.0)  # CPU-bound work on the loop: nothing ticks
    time.sleep(0.6)
    assert (agent.health_problem() or "").startswith("event loop stalled")
    assert healthz(agent) == 503
    time.sleep(0.8)  # the loop runs again
    assert agent.health_problem() is None and healthz(agent) == 200


def test_a_failed_start_up_turns_healthz_red(loop: LoopThread) -> None:
    agent = make_agent()

    async def broken_start() -> None:
        agent._tasks.append(asyncio.create_task(agent._heartbeat(), name="heartbeat"))
        raise RuntimeError("cannot list namespaces: forbidden")

    agent.start = broken_start  # type: ignore[method-assign]

    async def launch() -> None:
        agent.launch()
        await asyncio.sleep(0.05)

    loop.run(launch())
    assert agent.health_problem() == "start-up failed"
    assert healthz(agent) == 503


def test_a_node_call_past_the_reconcile_deadline_turns_healthz_red(loop: LoopThread) -> None:
    agent = make_agent(reconcile_deadline_seconds=0.2)
    release = threading.Event()
    held: list[asyncio.Task[Any]] = []

    async def stuck() -> None:
        agent._tasks.append(asyncio.create_task(agent._heartbeat(), name="heartbeat"))
        held.append(asyncio.create_task(agent._off_loop(release.wait, 10)))

    loop.run(stuck())
    time.sleep(0.5)
    assert "past the reconcile deadline" in (agent.health_problem() or "")
    assert healthz(agent) == 503
    release.set()
    time.sleep(0.2)
    assert agent.health_problem() is None


def test_a_reconcile_past_its_deadline_is_given_up_and_the_worker_lives_on(loop: LoopThread) -> None:
    agent = make_agent(reconcile_deadline_seconds=0.2)
    calls: list[str] = []

    async def slow(uid: str) -> Any:
        calls.append(uid)
        await asyncio.sleep(5 if uid == "slow" else 0)
        from istio_pod_network_controller.agent import Outcome

        return Outcome.DONE

    agent.reconcile = slow  # type: ignore[method-assign]

    async def work() -> None:
        worker = asyncio.create_task(agent._worker(), name="worker-0")
        agent._workers = [worker]
        agent.pods.store["slow"] = {}
        agent.queue.add("slow")
        await asyncio.sleep(0.4)
        agent.queue.add("quick")
        await asyncio.sleep(0.1)
        assert not worker.done()
        worker.cancel()

    loop.run(work())
    assert calls[0] == "slow" and "quick" in calls  # the worker went on to the next pod
    assert agent.queue.failures("slow") >= 1  # the slow one is retried with back-off


def test_a_mark_that_could_not_be_written_leaves_no_record(loop: LoopThread) -> None:
    """The API server away when the mark is patched: the sandbox must not count as done, or the
    pod would wait for the next resync (minutes) instead of the next retry."""
    from istio_pod_network_controller.agent import Plan, Programmed
    from istio_pod_network_controller.cluster.api import ApiError
    from istio_pod_network_controller.cluster.report import PodRef
    from istio_pod_network_controller.node.apply import ApplyResult
    from istio_pod_network_controller.node.netns import NetnsId
    from istio_pod_network_controller.render import render
    from istio_pod_network_controller.spec import parse_flags

    agent = make_agent()

    async def refused(*args: Any, **kwargs: Any) -> str:
        raise ApiError(503, "the API server is away")

    agent.reporter.set_status = refused  # type: ignore[method-assign]
    plan = Plan.of(parse_flags(["-p", "15001"]), render)
    record = Programmed("/proc/1/ns/net", NetnsId(1, 2), ("10.0.0.5",), plan, {})
    result = ApplyResult("/proc/1/ns/net", 2, "nft", 20, True, 5.0)
    ref = PodRef("shop", "web", "uid-1")

    async def mark() -> None:
        with pytest.raises(ApiError):
            await agent._mark(ref, record, result, {}, announce=True)

    loop.run(mark())
    assert "uid-1" not in agent._programmed

    async def accepted(*args: Any, **kwargs: Any) -> str:
        return "42"

    agent.reporter.set_status = accepted  # type: ignore[method-assign]

    async def mark_again() -> None:
        await agent._mark(ref, record, result, {}, announce=False)

    loop.run(mark_again())
    assert agent._programmed["uid-1"] is record and record.mark_version == "42"
