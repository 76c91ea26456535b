"""The agent's side of the hand-off (see ``..handoff``): a listener inside each waiting pod's
network namespace, and the mark sent to whoever connects there once it is ready.

The listener is made by a short-lived thread that enters the pod's namespace (a socket belongs
to the namespace it was made in, whichever thread uses it later), which also reads the
namespace's cookie from it. Everything after that runs on the event loop and never reads from a
connection: per pod at most ``MAX_CONNECTIONS`` connections are taken (then the listener is
closed), each is held until the mark is ready and gets it with a deadline for the write; the
listener goes when the waiter has ended, when the pod goes, or after ``ttl`` seconds. At most
``max_pods`` listeners are open at once. Whatever goes wrong here only leaves the waiter to the
downward-API file: the hand-off is never needed for a pod to be programmed or to start.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..handoff import ADDRESS, HandoffError, encode
from ..nscookie import socket_netns_cookie
from .netns import Netns, NetnsId, run_inside

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 4  # per pod: the waiter needs one (two if it restarts)
MAX_PODS = 256  # listeners open at once on the node
TTL_SECONDS = 300.0  # the waiter's own default timeout
SEND_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class Opened:
    """What the thread inside the namespace made: the listener (None when the name was taken,
    with ``why``) and the namespace's cookie (None on kernels without cookies)."""

    listener: socket.socket | None
    cookie: int | None
    why: str = ""


def listen_in(ns: Netns, address: bytes = ADDRESS) -> Opened:
    """A listening socket on ``address`` inside ``ns``, and ``ns``'s cookie. Raises NodeError when
    the namespace cannot be entered (as ``netns.netns_cookie`` does)."""
    return run_inside(ns, lambda: _listen_here(address), step="netns cookie", what=f"cannot enter {ns.path}")


def _listen_here(address: bytes) -> Opened:
    """In the namespace to listen in: the listener (None, with why, when the name is taken)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        cookie = socket_netns_cookie(sock)
        try:
            sock.bind(address)
            sock.listen(MAX_CONNECTIONS)
        except OSError as exc:
            sock.close()
            return Opened(None, cookie, f"cannot listen: {exc.strerror or exc}")
    except BaseException:
        sock.close()
        raise
    return Opened(sock, cookie)


@dataclass
class _Pending:
    netns: NetnsId
    cookie: int | None
    listener: socket.socket
    mark: asyncio.Future[bytes]
    opened_at: float
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    connections: int = 0
    served: int = 0


class Handoffs:
    """The open listeners of this node's waiting pods, by pod UID. Event loop only."""

    def __init__(
        self,
        *,
        max_pods: int = MAX_PODS,
        ttl: float = TTL_SECONDS,
        on_result: Callable[[str], None] = lambda result: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pods, self.ttl = max_pods, ttl
        self._on_result = on_result
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        # Pods whose namespace refused the name (taken inside it): not asked again for that
        # namespace, nor counted again, on every retry.
        self._refused: dict[str, NetnsId] = {}
        self._stopped = False

    def __len__(self) -> int:
        return len(self._pending)

    def listening(self, uid: str, netns: NetnsId) -> tuple[int | None] | None:
        """For a listener of ``uid``'s in ``netns``: its namespace's cookie, read when it was made
        (in a 1-tuple: None is a kernel without cookies); None when there is no such listener."""
        pending = self._pending.get(uid)
        if pending is None or pending.netns != netns or pending.listener.fileno() < 0:
            # A listener closed (every connection it takes taken) no longer holds its namespace:
            # a new one may have its inode number, so the cookie read then may not be its own.
            return None
        return (pending.cookie,)

    def refused(self, uid: str, netns: NetnsId) -> bool:
        """``uid``'s namespace ``netns`` refused the name already (see ``open``)."""
        return self._refused.get(uid) == netns

    def room(self) -> bool:
        return not self._stopped and len(self._pending) < self.max_pods

    def open(self, uid: str, netns: NetnsId, opened: Opened) -> None:
        """Serve ``opened.listener`` for ``uid`` (replacing any earlier listener of the pod's)."""
        self.close(uid, "replaced")
        if opened.listener is None:
            self._refused[uid] = netns
            self._on_result("unavailable")
            return
        if self._stopped:  # a worker that entered the namespace while the agent stopped
            opened.listener.close()
            return
        loop = asyncio.get_running_loop()
        pending = _Pending(netns, opened.cookie, opened.listener, loop.create_future(), self._clock())
        self._pending[uid] = pending
        task = loop.create_task(self._serve(uid, pending), name=f"handoff-{uid}")
        pending.tasks.add(task)
        task.add_done_callback(pending.tasks.discard)

    def ready(self, uid: str, status: str, detail: str) -> bool:
        """The mark for ``uid`` is ``status``/``detail``: send it to every connection, held or to
        come. False when there is no listener for the pod (or it already had its mark)."""
        pending = self._pending.get(uid)
        if pending is None or pending.mark.done():
            return False
        try:
            pending.mark.set_result(encode(status, detail))
        except HandoffError:  # too big to hand over; the file will show it
            self.close(uid, "too_big")
            return False
        return True

    def close(self, uid: str, result: str) -> None:
        self._refused.pop(uid, None)
        pending = self._pending.pop(uid, None)
        if pending is None:
            return
        for task in list(pending.tasks):
            task.cancel()
        fd = pending.listener.fileno()
        if fd >= 0:
            # The cancelled accept's reader goes first: closed under it, the fd number would be
            # given to the next socket while the loop still waits on it as the listener.
            asyncio.get_running_loop().remove_reader(fd)
        pending.listener.close()
        if not pending.mark.done():
            pending.mark.cancel()
        # One count per listener: "served" once a waiter had the mark, else why it closed.
        self._on_result("served" if pending.served else result)

    def close_all(self) -> None:
        """Every listener closed, and none opened any more."""
        self._stopped = True
        for uid in list(self._pending):
            self.close(uid, "stopped")
        self._refused.clear()

    async def _serve(self, uid: str, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        deadline = pending.opened_at + self.ttl
        try:
            while pending.connections < MAX_CONNECTIONS:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                try:
                    conn, _ = await asyncio.wait_for(loop.sock_accept(pending.listener), remaining)
                except TimeoutError:
                    break
                pending.connections += 1
                task = loop.create_task(self._send(pending, conn, deadline), name=f"handoff-send-{uid}")
                pending.tasks.add(task)
                task.add_done_callback(pending.tasks.discard)
            # Every connection it takes is taken: no new ones (the held ones still get the mark
            # until the deadline; the pod's entry stays, so it is not listened for again).
            pending.listener.close()
            await asyncio.sleep(max(0.0, deadline - self._clock()))
        except OSError as exc:
            log.info("hand-off listener failed", extra={"uid": uid, "error": exc.strerror or str(exc)})
        if self._pending.get(uid) is pending:
            self.close(uid, "expired")

    async def _send(self, pending: _Pending, conn: socket.socket, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            try:
                left = max(0.0, deadline - self._clock())
                mark = await asyncio.wait_for(asyncio.shield(pending.mark), left)
                await asyncio.wait_for(loop.sock_sendall(conn, mark), SEND_TIMEOUT)
            except (TimeoutError, OSError):
                return  # closed without a mark: the waiter reads the file
            pending.served += 1
