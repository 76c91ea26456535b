"""The work queue's guarantees: duplicates collapse, one worker per key, backoff on failure."""

from __future__ import annotations

import asyncio

import pytest

from istio_pod_network_controller.workqueue import ShutDown, WorkQueue


async def test_duplicates_collapse_into_one_item() -> None:
    q = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert await q.get() == "a"
    assert await q.get() == "b"


async def test_key_in_hand_is_not_given_to_a_second_worker_but_requeued_after_done() -> None:
    q = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")  # changed while being processed
    assert len(q) == 0
    second = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not second.done()
    q.done(key)
    assert await asyncio.wait_for(second, 1) == "a"


async def test_backoff_grows_and_forget_resets_it() -> None:
    q = WorkQueue(base_delay=0.01, max_delay=0.04)
    delays = [q.add_rate_limited("a") for _ in range(4)]
    assert delays == [0.01, 0.02, 0.04, 0.04]
    q.forget("a")
    assert q.failures("a") == 0
    assert q.add_rate_limited("a") == 0.01
    assert await asyncio.wait_for(q.get(), 1) == "a"


async def test_shutdown_wakes_idle_workers() -> None:
    q = WorkQueue()
    worker = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    q.shut_down()
    with pytest.raises(ShutDown):
        await asyncio.wait_for(worker, 1)
