"""The webhook as its own process under attack from this one (loopback only, bounded loops): a
thousand idle TLS connections, and the worst requests we can build sent concurrently, while a
normal admission request is made. The normal request must be answered within the API server's
budget; its latency with and without the attack is printed (run with ``-s`` to see it), never
compared with a fixed number.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipnc_dev import webhook_attack as attack
from ipnc_dev.webhookproc import WebhookProcess

IDLE = 1000
READ_TIMEOUT = 8.0
# Asyncio's TLS read buffer is 256 KiB a connection unless the server shrinks it (it does, to
# 16 KiB): a bound halfway, well above what the rest of a connection takes.
MAX_KIB_PER_CONNECTION = 128


@pytest.fixture
def webhook_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WebhookProcess]:
    extra = getattr(request, "param", ())
    process = WebhookProcess(None, extra=["--waiter-image=registry.example/ipnc:1", *extra], folder=tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def stopped_stats(process: WebhookProcess) -> dict[str, object]:
    process.stop()
    return next(r for r in process.records() if r.get("msg") == "webhook stopped")


async def normal_latencies(process: WebhookProcess, count: int, *, spacing: float = 0.0) -> list[float]:
    """``count`` normal admission requests, one after the other, ``spacing`` seconds apart; each
    must be admitted within the API server's budget."""
    seconds: list[float] = []
    for _ in range(count):
        answer = await attack.exchange(process.port, process.client_context(), attack.normal_review())
        assert attack.admitted(answer), answer
        seconds.append(answer.seconds)
        await asyncio.sleep(spacing)
    return seconds


def summary(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms"


@pytest.mark.parametrize(
    "webhook_process", [[f"--read-timeout={READ_TIMEOUT}", f"--max-connections={IDLE + 100}"]], indirect=True
)
async def test_a_thousand_idle_connections_neither_lock_out_nor_outstay_the_read_timeout(
    webhook_process: WebhookProcess,
) -> None:
    process = webhook_process
    limit = attack.raise_open_files(IDLE + 200)
    assert limit >= IDLE + 100, f"this test needs {IDLE + 100} open files, the hard limit allows {limit}"
    ctx = process.client_context()
    before = await normal_latencies(process, 5)
    rss_before = process.rss_mib()

    opened = time.monotonic()
    idle = await attack.open_idle(process.port, ctx, IDLE)
    took = time.monotonic() - opened
    rss_held = process.rss_mib()
    during = await normal_latencies(process, 5)
    closed = await attack.closed_after(idle, opened, READ_TIMEOUT + took + 30)
    stats = stopped_stats(process)

    close_times = [t for t in closed if t is not None]
    per_connection = (rss_held - rss_before) * 1024 / max(1, len(idle))
    print(
        f"\n{len(idle)} idle TLS connections opened in {took:.1f} s; webhook RSS {rss_before:.0f} -> "
        f"{rss_held:.0f} MiB ({per_connection:.0f} KiB each); server peak {stats['peak']} connections, "
        f"{stats['evicted']} closed for newer ones, {stats['closed_slow']} at the read timeout\n"
        f"idle connections closed after {min(close_times):.1f} to {max(close_times):.1f} s "
        f"(read timeout {READ_TIMEOUT:g} s; opening them all took {took:.1f} s)\n"
        f"normal admission: without them {summary(before)}; with them {summary(during)}"
    )
    assert len(idle) == IDLE
    assert None not in closed, "some idle connections were never closed"
    assert stats["closed_slow"] == IDLE - int(str(stats["evicted"]))
    # None was closed before the read timeout, unless the cap closed it for a newer connection.
    early = [t for t in close_times if t < READ_TIMEOUT * 0.95]
    assert len(early) <= int(str(stats["evicted"]))
    assert per_connection < MAX_KIB_PER_CONNECTION


async def test_the_worst_requests_sent_at_once_do_not_keep_a_normal_admission_out(
    webhook_process: WebhookProcess,
) -> None:
    process = webhook_process
    attack.raise_open_files(2000)
    ctx = process.client_context()
    before = await normal_latencies(process, 10)

    stop = asyncio.Event()
    attacker = asyncio.create_task(attack.attack(process.port, ctx, stop, max_bytes=4 * 1024 * 1024))
    await asyncio.sleep(3.0)  # let every kind of attack get going
    assert not attacker.done(), attacker
    rss_attacked = process.rss_mib()
    during = await normal_latencies(process, 20, spacing=0.5)  # over several read timeouts
    stop.set()
    counts = await asyncio.wait_for(attacker, 60)
    stats = stopped_stats(process)

    print(
        f"\nnormal admission: without attack {summary(before)}; under attack {summary(during)} "
        f"({statistics.median(during) / statistics.median(before):.1f}x the median)\n"
        f"attack sent {counts.sent}, answers {counts.answers}\n"
        f"server: {stats}; RSS under attack {rss_attacked:.0f} MiB"
    )
    assert counts.sent["at-cap"] > 0 and counts.sent["many-args"] > 0 and counts.sent["dribble"] > 0
    assert set(counts.answers["nested"]) == {400}
    assert set(counts.answers["garbage"]) == {400}
    assert 200 in counts.answers["at-cap"]
    tracebacks = [r for r in process.records() if "exception" in r or "Traceback" in str(r)]
    assert tracebacks == []
