"""The agent's metrics carry controller-runtime's and client-go's names (dashboards and alerts
written for those work unchanged), and the work queue and the Event recorder feed them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import generate_latest

from istio_pod_network_controller.cluster.report import Dropped, EventRecorder, PodRef
from istio_pod_network_controller.observe import (
    CONTROLLER,
    EVENT_DROP_REASONS,
    Metrics,
    ReconcileResult,
    WorkQueueMetrics,
)
from istio_pod_network_controller.workqueue import QueueMetrics, WorkQueue

EXPECTED = {
    "controller_runtime_reconcile_total": ("counter", {"controller", "result"}),
    "controller_runtime_reconcile_errors_total": ("counter", {"controller"}),
    "controller_runtime_reconcile_time_seconds": ("histogram", {"controller"}),
    "workqueue_depth": ("gauge", {"name", "controller"}),
    "workqueue_adds_total": ("counter", {"name", "controller"}),
    "workqueue_queue_duration_seconds": ("histogram", {"name", "controller"}),
    "workqueue_work_duration_seconds": ("histogram", {"name", "controller"}),
    "workqueue_retries_total": ("counter", {"name", "controller"}),
    "workqueue_unfinished_work_seconds": ("gauge", {"name", "controller"}),
    "workqueue_longest_running_processor_seconds": ("gauge", {"name", "controller"}),
    "ipnc_pods_initialized_total": ("counter", set()),
    "ipnc_errors_total": ("counter", {"reason"}),
    "ipnc_apply_seconds": ("histogram", set()),
    "ipnc_agent_info": ("gauge", {"mode", "backend"}),
    "ipnc_pods_watched": ("gauge", set()),
    "ipnc_watch_restarts_total": ("counter", {"resource", "cause"}),
    "ipnc_events_dropped_total": ("counter", {"reason"}),
    "ipnc_drift_repaired_total": ("counter", set()),
    "ipnc_reconcile_deadline_exceeded_total": ("counter", set()),
    "ipnc_mark_refresh_nudges_total": ("counter", set()),
}

QUEUE = {"name": CONTROLLER, "controller": CONTROLLER}


def exposed(metrics: Metrics) -> dict[str, str]:
    """Metric family name -> type, as /metrics announces them."""
    types: dict[str, str] = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
    return types


def sample(metrics: Metrics, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, dict(labels or {}))


def test_every_metric_is_exposed_under_its_name_and_type() -> None:
    metrics = Metrics()
    # Touch the label sets that only appear once used.
    metrics.errors.labels("internal")
    metrics.watch_restarts.labels("pods", "gone")
    metrics.queue_metrics()
    metrics.agent_info.labels("nftables", "nftables")
    types = exposed(metrics)
    for name, (kind, _) in EXPECTED.items():
        assert types.get(name) == kind, name
    assert not {name for name in types if name.startswith("ipnc_queue_depth")}  # now workqueue_depth


def test_labels_are_the_documented_ones() -> None:
    metrics = Metrics()
    metrics.errors.labels("internal").inc()
    metrics.watch_restarts.labels("pods", "gone").inc()
    metrics.queue_metrics().add()
    metrics.drift_repaired.inc()
    metrics.reconcile_deadline_exceeded.inc()
    metrics.refresh_nudges.inc()
    metrics.initialized.inc()
    metrics.apply_seconds.observe(0.01)
    metrics.pods_watched.set(1)
    metrics.agent_info.labels("iptables", "nft").set(1)
    metrics.observe_reconcile(ReconcileResult.SUCCESS, 0.1)
    seen: dict[str, set[str]] = {}
    for collected in metrics.registry.collect():
        for s in collected.samples:
            if not s.name.endswith("_created"):
                seen.setdefault(collected.name, set()).update(set(s.labels) - {"le"})
    for name, (kind, labels) in EXPECTED.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert seen.get(family, set[str]()) == labels, name


def test_every_reconcile_result_and_event_drop_reason_reads_zero_from_the_start() -> None:
    metrics = Metrics()
    for result in ReconcileResult:
        labels = {"controller": CONTROLLER, "result": result.value}
        assert sample(metrics, "controller_runtime_reconcile_total", labels) == 0
    assert sample(metrics, "controller_runtime_reconcile_errors_total", {"controller": CONTROLLER}) == 0
    assert {reason.value for reason in Dropped} == set(EVENT_DROP_REASONS)
    for reason in EVENT_DROP_REASONS:
        assert sample(metrics, "ipnc_events_dropped_total", {"reason": reason}) == 0
    assert [r.value for r in ReconcileResult] == ["success", "error", "requeue", "requeue_after"]


def test_a_reconcile_error_counts_as_an_error_and_in_the_total() -> None:
    metrics = Metrics()
    metrics.observe_reconcile(ReconcileResult.ERROR, 0.2)
    metrics.observe_reconcile(ReconcileResult.REQUEUE, 0.1)
    metrics.observe_reconcile(ReconcileResult.SUCCESS, 0.03)
    total = "controller_runtime_reconcile_total"
    assert sample(metrics, total, {"controller": CONTROLLER, "result": "error"}) == 1
    assert sample(metrics, total, {"controller": CONTROLLER, "result": "requeue"}) == 1
    assert sample(metrics, total, {"controller": CONTROLLER, "result": "success"}) == 1
    assert sample(metrics, "controller_runtime_reconcile_errors_total", {"controller": CONTROLLER}) == 1
    time = "controller_runtime_reconcile_time_seconds"
    assert sample(metrics, f"{time}_count", {"controller": CONTROLLER}) == 3
    assert sample(metrics, f"{time}_bucket", {"controller": CONTROLLER, "le": "0.05"}) == 1


async def test_the_work_queue_reports_through_the_adapter() -> None:
    metrics = Metrics()
    adapter: QueueMetrics = metrics.queue_metrics()  # the adapter satisfies the queue's protocol
    assert isinstance(adapter, WorkQueueMetrics)
    now = [100.0]
    q = WorkQueue(metrics=adapter, clock=lambda: now[0])
    q.add("a")
    q.add("b")
    assert sample(metrics, "workqueue_adds_total", QUEUE) == 2
    assert sample(metrics, "workqueue_depth", QUEUE) == 2
    now[0] += 0.5
    key = await q.get()
    assert sample(metrics, "workqueue_depth", QUEUE) == 1
    assert sample(metrics, "workqueue_queue_duration_seconds_count", QUEUE) == 1
    assert sample(metrics, "workqueue_queue_duration_seconds_sum", QUEUE) == 0.5
    now[0] += 3.0
    q.update_unfinished_work()
    assert sample(metrics, "workqueue_unfinished_work_seconds", QUEUE) == 3.0
    assert sample(metrics, "workqueue_longest_running_processor_seconds", QUEUE) == 3.0
    q.done(key)
    assert sample(metrics, "workqueue_work_duration_seconds_sum", QUEUE) == 3.0
    assert sample(metrics, "workqueue_longest_running_processor_seconds", QUEUE) == 0
    q.add_rate_limited(key)
    q.add_after("b", 10.0)
    assert sample(metrics, "workqueue_retries_total", QUEUE) == 2
    q.shut_down()
    assert sample(metrics, "workqueue_depth", QUEUE) == 0


def test_queue_depth_is_the_controller_queues_depth() -> None:
    metrics = Metrics()
    metrics.queue_depth.set(7)
    assert sample(metrics, "workqueue_depth", QUEUE) == 7


class RefusingApi:
    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        raise OSError("connection refused")

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        raise OSError("connection refused")


async def test_dropped_events_are_counted_by_reason() -> None:
    metrics = Metrics()
    events = EventRecorder(RefusingApi(), "node-a", capacity=1, on_drop=metrics.event_dropped)
    pod = PodRef("ns", "p", "u")
    events.record(pod, kind="Normal", reason="Initialized", message="a")
    events.record(pod, kind="Normal", reason="Initialized", message="a")
    events.record(pod, kind="Normal", reason="Initialized", message="b")  # the queue is full
    events.start()
    await events.stop(timeout=2)
    events.record(pod, kind="Normal", reason="Initialized", message="c")
    assert sample(metrics, "ipnc_events_dropped_total", {"reason": "write_failed"}) == 2
    assert sample(metrics, "ipnc_events_dropped_total", {"reason": "queue_full"}) == 1
    assert sample(metrics, "ipnc_events_dropped_total", {"reason": "stopped"}) == 1
