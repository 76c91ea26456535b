"""The mark, handed to the waiter inside the pod's own network namespace.

The kubelet shows the waiter the agent's mark by rewriting the pod's downward-API file, a
median 0.6 s after the patch on a real node (and, rarely, only at the pod's next periodic
sync). So the agent also hands the mark over directly: once it has located the pod's network
namespace, it listens there on an abstract unix socket (``ADDRESS``; abstract names belong to
a network namespace, so only processes in this pod's namespace can reach it, and nothing is
written to any file system); the waiter, which runs in that namespace with no privileges,
connects, and the agent sends the mark once the rules are applied and verified. The mark is the
same text as the annotations (``status`` and ``detail``), judged by the same rules for this
namespace (inode and cookie), and ``--verify`` still proves the redirect itself. The
annotations stay the durable record, and the file is still read: whichever shows the mark
first lets the pod go. A connection refused (no agent there yet, an older agent, a policy such
as SELinux forbidding it) only leaves the file to decide.

Who else could answer on that name: only processes in the pod's own network namespace, which
while the waiter runs (the pod's first init container) are the sandbox's pause process and the
waiter. A pod that went out of its way to squat the name would only fool its own waiter, as
writing its own annotations could; the agent never reads from the socket.

Standard library only: the waiter imports this.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Callable, Mapping

from . import names

# One name in every pod's namespace ("\0": the abstract namespace, see unix(7)).
ADDRESS = b"\0istio-pod-network-controller/mark"
# The mark is the detail annotation (bounded by MAX_DETAIL_BYTES) and the status, in JSON.
MAX_PAYLOAD_BYTES = names.MAX_DETAIL_BYTES + 4096
FIELDS = ("status", "detail")

# The waiter's connection attempts: often at first (the agent is usually about to listen), then
# less often (an agent that does not listen at all, or an older one, costs nothing then).
FAST_RETRY = 0.02
FAST_FOR = 5.0
SLOW_RETRY = 0.5


class HandoffError(Exception):
    """What came over the socket is not a mark."""


def encode(status: str, detail: str) -> bytes:
    """The agent's message: the two annotations as it writes them (``detail`` is JSON text)."""
    data = json.dumps({"status": status, "detail": detail}, separators=(",", ":")).encode()
    if len(data) > MAX_PAYLOAD_BYTES:
        raise HandoffError(f"a mark of {len(data)} bytes is over {MAX_PAYLOAD_BYTES}")
    return data


def decode(data: bytes) -> dict[str, str]:
    """The annotations the message stands for ({names.STATUS: ..., names.DETAIL: ...}), to be
    judged exactly as the file's. Raises HandoffError."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise HandoffError(f"over {MAX_PAYLOAD_BYTES} bytes")
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandoffError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or set(message) != set(FIELDS):
        raise HandoffError(f"not an object with exactly {', '.join(FIELDS)}")
    status, detail = message["status"], message["detail"]
    if not isinstance(status, str) or not isinstance(detail, str):
        raise HandoffError("status and detail must be strings")
    return {names.STATUS: status, names.DETAIL: detail}


class Client:
    """The waiter's side, never blocking: ``poll`` tries a connection when one is due and reads
    what has arrived; ``fileno`` is the socket to wait on while connected (else None) and
    ``due_in`` how long until the next attempt."""

    def __init__(self, address: bytes = ADDRESS, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self._clock = clock
        self._started = clock()
        self._next = self._started
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self.last_problem = ""  # why the last connection gave nothing usable (for the log)

    def fileno(self) -> int | None:
        return self._sock.fileno() if self._sock is not None else None

    def due_in(self) -> float:
        """Seconds until ``poll`` should run again for this client (0: now)."""
        if self._sock is not None:
            return SLOW_RETRY  # waiting on the socket; poll runs when it is readable anyway
        return max(0.0, self._next - self._clock())

    def _retry_later(self) -> None:
        now = self._clock()
        self._next = now + (FAST_RETRY if now - self._started < FAST_FOR else SLOW_RETRY)

    def _drop(self, problem: str) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buffer = None, bytearray()
        self.last_problem = problem
        self._retry_later()

    def poll(self) -> Mapping[str, str] | None:
        """The annotations the agent handed over, once they are all here; else None."""
        if self._sock is None:
            if self._clock() < self._next:
                return None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                sock.connect(self.address)
            except OSError as exc:
                sock.close()
                # ECONNREFUSED: nobody listens yet; EAGAIN: the backlog is full; others (EACCES
                # from a security policy) are the same to us: the file decides meanwhile.
                self._drop("" if exc.errno == errno.ECONNREFUSED else f"connect: {exc.strerror or exc}")
                return None
            self._sock = sock
        return self._read()

    def _read(self) -> Mapping[str, str] | None:
        assert self._sock is not None
        while True:
            try:
                chunk = self._sock.recv(MAX_PAYLOAD_BYTES + 1 - len(self._buffer))
            except (BlockingIOError, InterruptedError):
                return None  # more to come: wait on fileno()
            except OSError as exc:
                self._drop(f"read: {exc.strerror or exc}")
                return None
            if chunk:
                self._buffer += chunk
                if len(self._buffer) > MAX_PAYLOAD_BYTES:
                    self._drop(f"the message is over {MAX_PAYLOAD_BYTES} bytes")
                    return None
                continue
            data = bytes(self._buffer)
            if not data:
                self._drop("the agent closed the connection without a mark")
                return None
            try:
                found = decode(data)
            except HandoffError as exc:
                self._drop(f"not a mark: {exc}")
                return None
            self._drop("")
            return found

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
