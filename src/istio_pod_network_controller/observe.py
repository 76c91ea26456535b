"""What operators see of the agent: JSON logs, Prometheus metrics, /healthz and /readyz.

One small HTTP server (stdlib, in a thread) serves /metrics, /healthz and /readyz on one port,
so a DaemonSet needs one port and one probe configuration.
"""

from __future__ import annotations

import enum
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


CONTROLLER = "pod"  # the controller's name in controller-runtime's labels: the kind it reconciles


class ReconcileResult(enum.Enum):
    """controller-runtime's ``result`` label of ``controller_runtime_reconcile_total``."""

    SUCCESS = "success"  # done until the object changes
    ERROR = "error"  # failed; retried with back-off
    REQUEUE = "requeue"  # not done yet, no error; retried with back-off
    REQUEUE_AFTER = "requeue_after"  # asked to be looked at again after a given time


# controller-runtime's buckets for reconcile_time_seconds (5 ms to 60 s).
RECONCILE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 25.0, 30.0,
    40.0, 50.0, 60.0,
)  # fmt: skip
# client-go's buckets for the work queue's histograms: powers of ten from 10 ns to 1,000 s.
WORKQUEUE_BUCKETS = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)

EVENT_DROP_REASONS = ("queue_full", "write_failed", "stopped")


class Metrics:
    """The agent's metrics, in their own registry (tests run several agents in one process).

    Three families: controller-runtime's reconcile metrics and client-go's work queue metrics,
    under their own names so that existing dashboards and alerts work unchanged, and ours
    (``ipnc_``) for what only this agent knows.
    """

    def __init__(self, controller: str = CONTROLLER) -> None:
        self.registry = CollectorRegistry()
        self.controller = controller
        r = self.registry

        # -- controller-runtime ----------------------------------------------------------------
        self.reconcile_total = Counter(
            "controller_runtime_reconcile_total",
            "Total number of reconciliations per controller",
            ["controller", "result"],
            registry=r,
        )
        self.reconcile_errors = Counter(
            "controller_runtime_reconcile_errors_total",
            "Total number of reconciliation errors per controller",
            ["controller"],
            registry=r,
        )
        self.reconcile_time = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            ["controller"],
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )

        # -- client-go's work queue ------------------------------------------------------------
        queue = ["name", "controller"]
        self.workqueue_depth = Gauge("workqueue_depth", "Current depth of workqueue", queue, registry=r)
        self.workqueue_adds = Counter(
            "workqueue_adds_total", "Total number of adds handled by workqueue", queue, registry=r
        )
        self.workqueue_queue_duration = Histogram(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            queue,
            buckets=WORKQUEUE_BUCKETS,
            registry=r,
        )
        self.workqueue_work_duration = Histogram(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes",
            queue,
            buckets=WORKQUEUE_BUCKETS,
            registry=r,
        )
        self.workqueue_retries = Counter(
            "workqueue_retries_total", "Total number of retries handled by workqueue", queue, registry=r
        )
        self.workqueue_unfinished_work = Gauge(
            "workqueue_unfinished_work_seconds",
            "How many seconds of work has been done that is in progress and has not been observed by "
            "work_duration. Large values indicate stuck threads.",
            queue,
            registry=r,
        )
        self.workqueue_longest_running_processor = Gauge(
            "workqueue_longest_running_processor_seconds",
            "How many seconds has the longest running processor for workqueue been running",
            queue,
            registry=r,
        )

        # -- ours ------------------------------------------------------------------------------
        self.agent_info = Gauge(
            "ipnc_agent_info",
            "Always 1: which of Istio's modes the agent writes (iptables or nftables) and with which tools",
            ["mode", "backend"],
            registry=r,
        )
        self.initialized = Counter(
            "ipnc_pods_initialized", "Pods whose redirect rules were applied and verified", registry=r
        )
        self.errors = Counter("ipnc_errors", "Reconcile errors by reason", ["reason"], registry=r)
        self.apply_seconds = Histogram(
            "ipnc_apply_seconds",
            "Time to apply and verify one pod's rules",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.pods_watched = Gauge("ipnc_pods_watched", "Pods of this node in the agent's cache", registry=r)
        self.watch_restarts = Counter(
            "ipnc_watch_restarts", "Watch restarts by resource and cause", ["resource", "cause"], registry=r
        )
        self.events_dropped = Counter(
            "ipnc_events_dropped", "Events not written to the API server, by reason", ["reason"], registry=r
        )
        self.drift_repaired = Counter(
            "ipnc_drift_repaired",
            "Programmed pods whose rules were found missing or changed and were applied again",
            registry=r,
        )
        self.refresh_nudges = Counter(
            "ipnc_mark_refresh_nudges",
            "Marks written again because the pod's waiter was still running a while after the mark "
            "(the kubelet had not rewritten its downward API file)",
            registry=r,
        )
        self.handoffs = Counter(
            "ipnc_mark_handoffs",
            "Listeners for the mark's hand-off in pods' network namespaces, by how they ended: "
            "served (a waiter had the mark), unavailable (the name was taken in the pod), expired, "
            "waiter_done (the waiter ended without it), gone (the pod went), replaced, stopped, too_big",
            ["result"],
            registry=r,
        )
        self.reconcile_deadline_exceeded = Counter(
            "ipnc_reconcile_deadline_exceeded",
            "Reconciles abandoned because they took longer than their deadline",
            registry=r,
        )

        # Series that exist from the start read 0 instead of missing, so that rate() and alerts
        # work before the first occurrence (controller-runtime does the same for its results).
        for result in ReconcileResult:
            self.reconcile_total.labels(controller, result.value)
        self.reconcile_errors.labels(controller)
        self.reconcile_time.labels(controller)
        for reason in EVENT_DROP_REASONS:
            self.events_dropped.labels(reason)
        # The depth of the controller's queue; the same series the queue's own adapter sets.
        self.queue_depth = self.workqueue_depth.labels(controller, controller)

    def observe_reconcile(self, result: ReconcileResult, seconds: float) -> None:
        """One reconcile ended with ``result`` after ``seconds``."""
        self.reconcile_total.labels(self.controller, result.value).inc()
        if result is ReconcileResult.ERROR:
            self.reconcile_errors.labels(self.controller).inc()
        self.reconcile_time.labels(self.controller).observe(seconds)

    def event_dropped(self, reason: str, count: int = 1) -> None:
        """``count`` occurrences of an Event were not written (``reason``: one of
        ``EVENT_DROP_REASONS``); the ``on_drop`` of ``EventRecorder``."""
        self.events_dropped.labels(reason).inc(count)

    def queue_metrics(self, name: str | None = None) -> WorkQueueMetrics:
        """The adapter a ``WorkQueue`` reports to; ``name`` defaults to the controller's."""
        return WorkQueueMetrics(self, name or self.controller)


class WorkQueueMetrics:
    """Connects a ``WorkQueue``'s ``QueueMetrics`` protocol to the ``workqueue_*`` series of one
    queue name (client-go's MetricsProvider, as controller-runtime implements it)."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        labels = (name, metrics.controller)
        self._depth = metrics.workqueue_depth.labels(*labels)
        self._adds = metrics.workqueue_adds.labels(*labels)
        self._latency = metrics.workqueue_queue_duration.labels(*labels)
        self._work = metrics.workqueue_work_duration.labels(*labels)
        self._retries = metrics.workqueue_retries.labels(*labels)
        self._unfinished = metrics.workqueue_unfinished_work.labels(*labels)
        self._longest = metrics.workqueue_longest_running_processor.labels(*labels)

    def set_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def add(self) -> None:
        self._adds.inc()

    def observe_queue_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def observe_work_duration(self, seconds: float) -> None:
        self._work.observe(seconds)

    def retry(self) -> None:
        self._retries.inc()

    def set_unfinished_work(self, total_seconds: float, longest_seconds: float) -> None:
        self._unfinished.set(total_seconds)
        self._longest.set(longest_seconds)


class _Server6(ThreadingHTTPServer):
    """The same server on an IPv6 address; on ``::`` it takes IPv4 too (Linux maps it in unless
    net.ipv6.bindv6only is set), so one port serves IPv4, IPv6 and dual-stack clusters."""

    address_family = socket.AF_INET6


class HealthServer:
    """Serves /metrics, /healthz (the loop is alive) and /readyz (first list processed)."""

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        *,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok = healthy()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n")
                elif self.path == "/readyz":
                    ok = ready()
                    self._send(
                        200 if ok else 503, b"ok\n" if ok else b"not ready: first list not processed\n"
                    )
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        if ":" in address[0]:
            try:
                self.server: ThreadingHTTPServer = _Server6(address, Handler)
            except OSError:
                if address[0] != "::":
                    raise
                # A host with IPv6 switched off: "any address" falls back to IPv4's.
                self.server = ThreadingHTTPServer(("0.0.0.0", address[1]), Handler)
        else:
            self.server = ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
