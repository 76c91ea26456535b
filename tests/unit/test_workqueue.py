"""The work queue's guarantees: duplicates collapse, one worker per key, rate-limited retries that
stay bounded however often a key fails, and the metrics client-go's queue reports."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest

from istio_pod_network_controller.workqueue import (
    ExponentialBackoff,
    MaxOf,
    ShutDown,
    TokenBucket,
    WorkQueue,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordedMetrics:
    depths: list[int] = field(default_factory=list)
    adds: int = 0
    latencies: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    retries: int = 0
    unfinished: list[tuple[float, float]] = field(default_factory=list)

    def set_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def add(self) -> None:
        self.adds += 1

    def observe_queue_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def observe_work_duration(self, seconds: float) -> None:
        self.durations.append(seconds)

    def retry(self) -> None:
        self.retries += 1

    def set_unfinished_work(self, total_seconds: float, longest_seconds: float) -> None:
        self.unfinished.append((total_seconds, longest_seconds))


# -- queue basics ------------------------------------------------------------------------------


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


async def test_shutdown_wakes_idle_workers() -> None:
    q = WorkQueue()
    worker = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    q.shut_down()
    with pytest.raises(ShutDown):
        await asyncio.wait_for(worker, 1)


async def test_adds_after_shutdown_are_ignored() -> None:
    q = WorkQueue()
    q.shut_down()
    q.add("a")
    q.add_after("a", 0.01)
    assert q.add_rate_limited("a") >= 0
    assert len(q) == 0
    with pytest.raises(ShutDown):
        await q.get()


# -- per-key back-off --------------------------------------------------------------------------


async def test_backoff_grows_and_forget_resets_it() -> None:
    q = WorkQueue(base_delay=0.01, max_delay=0.04)
    delays = [q.add_rate_limited("a") for _ in range(4)]
    assert delays == [0.01, 0.02, 0.04, 0.04]
    assert q.num_requeues("a") == q.failures("a") == 4
    q.forget("a")
    assert q.failures("a") == 0
    assert q.add_rate_limited("a") == 0.01
    assert await asyncio.wait_for(q.get(), 1) == "a"


def test_backoff_is_per_key() -> None:
    backoff = ExponentialBackoff(0.01, 10.0)
    assert [backoff.when("a") for _ in range(3)] == [0.01, 0.02, 0.04]
    assert backoff.when("b") == 0.01
    assert backoff.num_requeues("a") == 3


def test_a_million_failures_on_one_key_cost_no_overflow_and_wait_exactly_the_cap() -> None:
    backoff = ExponentialBackoff(0.05, 30.0)
    delays = [backoff.when("pod") for _ in range(1_000_000)]
    assert delays[-1] == 30.0
    assert max(delays) == 30.0
    assert delays.index(30.0) == 10  # 0.05 * 2**10 = 51.2 is the first past the cap
    assert backoff.num_requeues("pod") == 1_000_000


def test_extreme_parameters_never_overflow() -> None:
    backoff = ExponentialBackoff(1e-300, 1e300)  # the ratio itself overflows a float
    delays = [backoff.when("k") for _ in range(3000)]
    assert delays[-1] == 1e300
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))


async def test_two_thousand_failures_through_the_queue_raise_nothing_and_wait_the_cap() -> None:
    clock = FakeClock()
    q = WorkQueue(base_delay=0.05, max_delay=30.0, clock=clock)
    delays = []
    for _ in range(2000):
        clock.now += 1.0  # 1 s apart: the 10 qps bucket never limits
        delays.append(q.add_rate_limited("pod"))
    assert delays[-1] == 30.0
    assert q.failures("pod") == 2000
    q.forget("pod")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_backoff_parameters_must_be_finite_and_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="finite number above 0"):
        ExponentialBackoff(bad, 10.0)
    with pytest.raises(ValueError, match="finite number above 0"):
        ExponentialBackoff(0.01, bad)
    with pytest.raises(ValueError, match="finite number above 0"):
        TokenBucket(bad, 10)


# -- token bucket ------------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_spaces_retries_at_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(qps=10.0, burst=3, clock=clock)
    assert [bucket.when(f"k{i}") for i in range(3)] == [0.0, 0.0, 0.0]
    waits = [bucket.when(f"x{i}") for i in range(3)]
    assert waits == pytest.approx([0.1, 0.2, 0.3])  # each reservation takes the next slot


def test_bucket_refills_with_time_but_not_beyond_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(qps=10.0, burst=2, clock=clock)
    bucket.when("a")
    bucket.when("b")
    assert bucket.when("c") == pytest.approx(0.1)
    clock.now += 0.2  # pays back the debt, refills one token
    assert bucket.when("d") == 0.0
    clock.now += 3600  # a long quiet time refills only up to the burst
    assert [bucket.when("e"), bucket.when("f")] == [0.0, 0.0]
    assert bucket.when("g") == pytest.approx(0.1)


def test_bucket_ignores_a_clock_stepping_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(qps=1.0, burst=1, clock=clock)
    bucket.when("a")
    clock.now -= 100
    assert bucket.when("b") == pytest.approx(1.0)


def test_bucket_burst_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10.0, 0)


async def test_rate_limited_delay_is_the_larger_of_backoff_and_bucket() -> None:
    clock = FakeClock()
    q = WorkQueue(base_delay=0.001, max_delay=30.0, qps=1.0, burst=2, clock=clock)
    # Different keys: each one's own back-off is 1 ms, the bucket decides once it is empty.
    delays = [q.add_rate_limited(f"pod-{i}") for i in range(4)]
    assert delays == pytest.approx([0.001, 0.001, 1.0, 2.0])
    # One key failing once a second: the bucket keeps up, the key's own back-off decides.
    clock.now += 10.0  # the bucket refills to its burst
    repeated = []
    for _ in range(12):
        clock.now += 1.0
        repeated.append(q.add_rate_limited("hot"))
    assert repeated == pytest.approx([0.001 * 2**i for i in range(12)])
    for i in range(4):
        q.forget(f"pod-{i}")
    q.forget("hot")


def test_max_of_counts_the_failure_in_every_limiter() -> None:
    clock = FakeClock()
    backoff = ExponentialBackoff(0.01, 1.0)
    bucket = TokenBucket(qps=1.0, burst=1, clock=clock)
    limiter = MaxOf(backoff, bucket)
    assert limiter.when("a") == 0.01
    assert limiter.when("a") == pytest.approx(1.0)  # the bucket is empty now
    assert limiter.num_requeues("a") == 2 == backoff.num_requeues("a")
    limiter.forget("a")
    assert limiter.num_requeues("a") == 0


# -- add_after (RequeueAfter) ------------------------------------------------------------------


async def test_add_after_brings_the_key_back_later_and_the_earliest_time_wins() -> None:
    q = WorkQueue()
    q.add_after("a", 30.0)
    q.add_after("a", 0.02)  # earlier: replaces the 30 s timer
    q.add_after("a", 10.0)  # later: the 20 ms one stays
    assert len(q) == 0
    assert await asyncio.wait_for(q.get(), 1) == "a"
    q.done("a")
    await asyncio.sleep(0.05)
    assert len(q) == 0  # the replaced timers were cancelled, not merely outrun


async def test_add_after_zero_adds_at_once_and_cancels_a_pending_timer() -> None:
    q = WorkQueue()
    q.add_after("a", 0.02)
    q.add_after("a", 0)
    assert len(q) == 1
    assert await q.get() == "a"
    q.done("a")
    await asyncio.sleep(0.05)
    assert len(q) == 0


async def test_forget_cancels_a_pending_retry() -> None:
    q = WorkQueue(base_delay=0.01)
    q.add_rate_limited("a")
    q.forget("a")
    await asyncio.sleep(0.05)
    assert len(q) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
async def test_add_after_refuses_a_delay_that_is_not_a_number_of_seconds(bad: float) -> None:
    q = WorkQueue()
    with pytest.raises(ValueError, match="finite"):
        q.add_after("a", bad)


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_follow_a_key_through_add_get_and_done() -> None:
    clock = FakeClock()
    metrics = RecordedMetrics()
    q = WorkQueue(metrics=metrics, clock=clock)
    q.add("a")
    q.add("a")  # a duplicate is no add
    q.add("b")
    assert metrics.adds == 2
    assert metrics.depths[-1] == 2

    clock.now += 2.0
    assert await q.get() == "a"
    assert metrics.latencies == [2.0]
    assert metrics.depths[-1] == 1

    clock.now += 5.0
    q.update_unfinished_work()
    assert metrics.unfinished[-1] == (5.0, 5.0)
    assert await q.get() == "b"
    clock.now += 1.0
    q.update_unfinished_work()
    assert metrics.unfinished[-1] == (7.0, 6.0)  # a for 6 s, b for 1 s

    q.done("a")
    assert metrics.durations == [6.0]
    assert metrics.unfinished[-1] == (1.0, 1.0)
    q.done("b")
    assert metrics.durations == [6.0, 1.0]
    assert metrics.unfinished[-1] == (0.0, 0.0)


async def test_a_key_changed_while_in_hand_counts_in_depth_until_a_worker_takes_it() -> None:
    clock = FakeClock()
    metrics = RecordedMetrics()
    q = WorkQueue(metrics=metrics, clock=clock)
    q.add("a")
    await q.get()
    q.add("a")
    assert metrics.depths[-1] == 1
    assert len(q) == 0  # but no worker can take it yet
    q.done("a")
    assert await q.get() == "a"
    assert metrics.depths[-1] == 0
    assert metrics.adds == 2


async def test_retries_count_every_put_back() -> None:
    metrics = RecordedMetrics()
    q = WorkQueue(metrics=metrics)
    q.add_rate_limited("a")
    q.add_after("b", 5.0)
    q.add_after("c", 0)
    assert metrics.retries == 3
    q.shut_down()
    assert metrics.depths[-1] == 0


async def test_done_for_a_key_not_in_hand_changes_nothing() -> None:
    metrics = RecordedMetrics()
    q = WorkQueue(metrics=metrics)
    q.done("never-got")
    assert metrics.durations == []
    assert len(q) == 0
