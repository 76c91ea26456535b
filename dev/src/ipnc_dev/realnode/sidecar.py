"""The stub sidecar image's program: listens where Istio's proxy would, and says what reached it.

Envoy cannot be built on this machine, so the real-node tier runs Istio's injected pods with
this in place of ``istio-proxy``: the outbound (15001) and inbound (15006) capture ports answer
each connection with a JSON report -- listener, peer, original destination (SO_ORIGINAL_DST),
the token the client sent -- and print the same report as one line on stdout (the container's
log), so a test can tell that an application's connection was redirected and where it was
addressed. Health (15021 ``/healthz/ready``, which the injected startup and readiness probes
ask), pilot-agent's 15020 and the Prometheus port 15090 answer HTTP. It ignores its arguments
(``proxy sidecar --domain ...``, as injected) and runs as whatever user the pod gives it (1337).

Only the standard library and ``ipnc_dev.stubproxy`` (itself standard-library only): the image
holds these two files on Debian's python, nothing else of the development package.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from .. import stubproxy

NAME = "istio-proxy"
CAPTURE_PORTS = (15001, 15006)
HTTP_PORTS = (15021, 15020, 15090)
READ_LIMIT = 512
READ_TIMEOUT = 5.0
_print_lock = threading.Lock()


def report(*, port: int, conn: socket.socket, peer: object, token: str) -> dict[str, object]:
    """What one captured connection is answered with (and logged as)."""
    orig = stubproxy.original_dst(conn)
    local = conn.getsockname()
    return {
        "server": NAME,
        "pod": os.environ.get("POD_NAME", ""),
        "proto": "tcp",
        "port": port,
        "local": list(local[:2]),
        "peer": list(peer[:2]) if isinstance(peer, tuple) else None,
        "orig": list(orig) if orig else None,
        "uid": os.geteuid(),
        "token": token,
    }


def _emit(line: dict[str, object]) -> None:
    with _print_lock:
        print(json.dumps(line), flush=True)


def _answer(conn: socket.socket, peer: object, port: int) -> None:
    with conn:
        conn.settimeout(READ_TIMEOUT)
        data = b""
        try:
            while b"\n" not in data and len(data) < READ_LIMIT:
                chunk = conn.recv(READ_LIMIT - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        answer = report(port=port, conn=conn, peer=peer, token=data.decode(errors="replace").strip())
        _emit(answer)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(answer).encode() + b"\n")


def _serve(sock: socket.socket, port: int) -> None:
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        threading.Thread(target=_answer, args=(conn, peer, port), daemon=True).start()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"# stub sidecar\n" if self.path.startswith("/stats") else b"ok\n"
        known = self.path in ("/healthz/ready", "/ready") or self.path.startswith("/stats")
        self.send_response(200 if known else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every second: not logged
        del format, args


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # Istio's injected arguments are for pilot-agent
    try:
        bound = stubproxy.bind_all(list(CAPTURE_PORTS), [], [], None)
        servers = [http.server.ThreadingHTTPServer(("0.0.0.0", port), _Health) for port in HTTP_PORTS]
    except OSError as e:
        print(f"stub sidecar: cannot listen: {e}", file=sys.stderr, flush=True)
        return 1
    for sock, port in bound:
        threading.Thread(target=_serve, args=(sock, port), daemon=True).start()
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    # As a container's PID 1 it gets no default action for SIGTERM: exit on it explicitly.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _emit({"server": NAME, "pod": os.environ.get("POD_NAME", ""), "ready": True, "uid": os.geteuid()})
    threading.Event().wait()  # until the kubelet stops the container
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
