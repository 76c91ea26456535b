"""A work queue of keys, as client-go's: duplicates collapse, a key is never handed to two workers
at once, and failures come back later, rate limited.

Keys, not events: a worker reads the current state when it gets a key, so ten changes to a pod
while it waits are one reconcile. Retries are limited as client-go's default controller limiter
does it: the larger of a per-key exponential back-off, whose exponent is capped so that a key that
failed a million times costs the same arithmetic as one that failed ten times, and one token
bucket for the whole queue, so that many failing keys at once cannot make the agent spin. What
the queue does is reported through ``QueueMetrics`` (client-go's MetricsProvider in one object),
so this module knows nothing of Prometheus.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

Clock = Callable[[], float]

# client-go's DefaultControllerRateLimiter bucket: 10 retries a second overall, 100 at once.
DEFAULT_QPS = 10.0
DEFAULT_BURST = 100

# 2.0 ** 1024 raises OverflowError; no exponent at or above this one is ever computed.
_MAX_EXPONENT = 1023


class ShutDown(Exception):
    """The queue was shut down and is empty."""


def _positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number above 0, not {value!r}")
    return float(value)


class RateLimiter(Protocol):
    """How long a key waits before it comes back after a failure (client-go's RateLimiter)."""

    def when(self, key: str) -> float:
        """Seconds until ``key`` may come back; counts one more requeue of it."""
        ...

    def forget(self, key: str) -> None:
        """``key`` succeeded or was dropped: start its back-off again from the beginning."""
        ...

    def num_requeues(self, key: str) -> int:
        """How many times ``key`` was requeued since it was last forgotten."""
        ...


class ExponentialBackoff:
    """Per key: ``base * 2**failures`` seconds, at most ``maximum``.

    The answer is ``maximum`` from the first exponent at which the doubling reaches it, without
    computing the power, so the arithmetic stays small however often a key fails.
    """

    def __init__(self, base: float = 0.005, maximum: float = 1000.0) -> None:
        self.base = _positive("base delay", base)
        self.maximum = _positive("maximum delay", maximum)
        # log2 of each separately: maximum / base itself may overflow to inf.
        needed = math.ceil(math.log2(self.maximum) - math.log2(self.base))
        self._cap_exponent = max(0, min(_MAX_EXPONENT, needed))
        self._failures: dict[str, int] = {}

    def when(self, key: str) -> float:
        exponent = self._failures.get(key, 0)
        self._failures[key] = exponent + 1
        if exponent >= self._cap_exponent:
            return self.maximum
        return min(self.maximum, self.base * 2.0**exponent)

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def num_requeues(self, key: str) -> int:
        return self._failures.get(key, 0)


class TokenBucket:
    """One bucket for the whole queue: ``burst`` retries at once, then ``qps`` a second.

    Each call reserves the next token even when it has to wait for it (as Go's
    ``rate.Limiter.Reserve``), so a flood of failures is spread out in time instead of coming
    back together. It keeps no state per key.
    """

    def __init__(
        self, qps: float = DEFAULT_QPS, burst: int = DEFAULT_BURST, *, clock: Clock = time.monotonic
    ) -> None:
        self.qps = _positive("qps", qps)
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def when(self, key: str) -> float:
        now = self._clock()
        if now > self._last:  # a clock that steps back refills nothing
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def forget(self, key: str) -> None:
        pass

    def num_requeues(self, key: str) -> int:
        return 0


class MaxOf:
    """The longest wait any of the limiters asks for (client-go's MaxOfRateLimiter)."""

    def __init__(self, *limiters: RateLimiter) -> None:
        if not limiters:
            raise ValueError("MaxOf needs at least one rate limiter")
        self.limiters = limiters

    def when(self, key: str) -> float:
        # Every limiter must see the failure (the bucket spends a token, the back-off counts it).
        return max([limiter.when(key) for limiter in self.limiters])

    def forget(self, key: str) -> None:
        for limiter in self.limiters:
            limiter.forget(key)

    def num_requeues(self, key: str) -> int:
        return max(limiter.num_requeues(key) for limiter in self.limiters)


def default_rate_limiter(
    *,
    base_delay: float = 0.05,
    max_delay: float = 30.0,
    qps: float = DEFAULT_QPS,
    burst: int = DEFAULT_BURST,
    clock: Clock = time.monotonic,
) -> MaxOf:
    return MaxOf(ExponentialBackoff(base_delay, max_delay), TokenBucket(qps, burst, clock=clock))


class QueueMetrics(Protocol):
    """What the queue reports, in client-go's workqueue vocabulary."""

    def set_depth(self, depth: int) -> None:
        """Keys waiting for a worker, including a key changed while a worker has it."""
        ...

    def add(self) -> None:
        """One key became pending (a duplicate of a pending key is not counted)."""
        ...

    def observe_queue_latency(self, seconds: float) -> None:
        """A key waited this long from its add to a worker's get."""
        ...

    def observe_work_duration(self, seconds: float) -> None:
        """A worker had a key this long, from get to done."""
        ...

    def retry(self) -> None:
        """A key was put back for later (``add_after``, ``add_rate_limited``)."""
        ...

    def set_unfinished_work(self, total_seconds: float, longest_seconds: float) -> None:
        """Keys in workers' hands now: the sum of their times so far, and the longest one."""
        ...


class NoMetrics:
    """Reports nothing."""

    def set_depth(self, depth: int) -> None:
        pass

    def add(self) -> None:
        pass

    def observe_queue_latency(self, seconds: float) -> None:
        pass

    def observe_work_duration(self, seconds: float) -> None:
        pass

    def retry(self) -> None:
        pass

    def set_unfinished_work(self, total_seconds: float, longest_seconds: float) -> None:
        pass


class WorkQueue:
    """The queue. ``base_delay``, ``max_delay``, ``qps`` and ``burst`` build the default rate
    limiter (``default_rate_limiter``); ``rate_limiter`` replaces it. ``clock`` times the metrics
    and the bucket; the delays themselves run on the event loop's clock."""

    def __init__(
        self,
        *,
        base_delay: float = 0.05,
        max_delay: float = 30.0,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        rate_limiter: RateLimiter | None = None,
        metrics: QueueMetrics | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()  # queued, or to be queued again when done
        self._processing: set[str] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._added_at: dict[str, float] = {}  # dirty key -> when it became dirty
        self._started_at: dict[str, float] = {}  # key in a worker's hands -> since when
        self._shutting_down = False
        self._clock = clock
        self.rate_limiter: RateLimiter = rate_limiter or default_rate_limiter(
            base_delay=base_delay, max_delay=max_delay, qps=qps, burst=burst, clock=clock
        )
        self.metrics: QueueMetrics = metrics or NoMetrics()

    def __len__(self) -> int:
        """Keys a worker could take now (not those held until their previous round is done)."""
        return len(self._queue)

    def add(self, key: str) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        self._added_at[key] = self._clock()
        self.metrics.add()
        self.metrics.set_depth(len(self._dirty))
        if key not in self._processing:
            self._queue.append(key)
            self._notify()

    def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` in ``delay`` seconds (the earliest pending time wins; 0 or less: now).

        The answer to a reconcile that asks to look again later; counted as a retry, as
        client-go does. ``delay`` must be a finite number (NaN or infinity is a caller's bug).
        """
        if not math.isfinite(delay):
            raise ValueError(f"delay must be a finite number of seconds, not {delay!r}")
        if self._shutting_down:
            return
        self.metrics.retry()
        pending = self._timers.get(key)
        if delay <= 0:
            if pending is not None:
                pending.cancel()
                del self._timers[key]
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if pending is not None:
            if pending.when() <= when:
                return
            pending.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: str) -> float:
        """Queue ``key`` again once the rate limiter allows; returns the delay. Never raises,
        however often the key has failed."""
        delay = self.rate_limiter.when(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """The key succeeded (or was dropped): reset its back-off and cancel its pending retry
        (a later answer supersedes an earlier "try again"; client-go keeps the timer)."""
        self.rate_limiter.forget(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def num_requeues(self, key: str) -> int:
        return self.rate_limiter.num_requeues(key)

    def failures(self, key: str) -> int:
        """The same as ``num_requeues``."""
        return self.num_requeues(key)

    def _notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def get(self) -> str:
        while not self._queue:
            if self._shutting_down:
                raise ShutDown
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._notify()  # pass the wake-up on to another worker
                raise
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        now = self._clock()
        added = self._added_at.pop(key, None)
        if added is not None:
            self.metrics.observe_queue_latency(max(0.0, now - added))
        self._started_at[key] = now
        self.metrics.set_depth(len(self._dirty))
        self.update_unfinished_work()
        return key

    def done(self, key: str) -> None:
        if key not in self._processing:
            return
        self._processing.discard(key)
        started = self._started_at.pop(key, None)
        if started is not None:
            self.metrics.observe_work_duration(max(0.0, self._clock() - started))
        if key in self._dirty:
            self._queue.append(key)
            self._notify()
        self.update_unfinished_work()

    def update_unfinished_work(self) -> None:
        """Report how long the keys now in workers' hands have been there. Called on every get
        and done; call it periodically too (client-go does every 500 ms), or a worker stuck on
        one key shows only when it finally lets go."""
        now = self._clock()
        ages = [max(0.0, now - started) for started in self._started_at.values()]
        self.metrics.set_unfinished_work(sum(ages), max(ages, default=0.0))

    def shut_down(self) -> None:
        """Stop accepting keys; workers finish what is in hand, then get ShutDown."""
        self._shutting_down = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queue.clear()
        self._dirty.clear()
        self._added_at.clear()
        self.metrics.set_depth(0)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
