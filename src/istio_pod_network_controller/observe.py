"""What operators see of the agent: JSON logs, Prometheus metrics, /healthz and /readyz.

One small HTTP server (stdlib, in a thread) serves /metrics, /healthz and /readyz on one port,
so a DaemonSet needs one port and one probe configuration.
"""

from __future__ import annotations

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


class Metrics:
    """The agent's metrics, in their own registry (tests run several agents in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.queue_depth = Gauge("ipnc_queue_depth", "Pods waiting to be reconciled", registry=r)
        self.pods_watched = Gauge("ipnc_pods_watched", "Pods of this node in the agent's cache", registry=r)
        self.watch_restarts = Counter(
            "ipnc_watch_restarts", "Watch restarts by resource and cause", ["resource", "cause"], registry=r
        )


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
        outer = self

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
        self._outer = outer

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
