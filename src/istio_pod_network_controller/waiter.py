"""The waiting init container: hold the pod back until the agent has programmed *this* sandbox.

It runs in every meshed pod with no privileges at all (any non-root UID but the proxy's, no
capabilities, read-only root file system), so it can only read: its pod's annotations from the
downward API volume, and the inode of its own network namespace. It passes when the agent's mark
(``status: initialized``) names that inode, so a mark left from an earlier sandbox of the same
pod never counts. It notices a change at once through inotify on the volume's directory (the
kubelet swaps a ``..data`` symlink there), re-reading at least every second in case an event is
missed, and falls back to polling every 50 ms where inotify cannot be had.

``--verify`` proves what the mark claims, as linkerd's network-validator does: it listens on the
proxy's outbound port, connects to a TEST-NET address that the pod's rules capture, and requires
the random token its own listener sends, plus the original destination the kernel recorded. It
takes the probe only from the agent's plan in the mark's detail (``verify``, see ``probe``):
nothing the pod can write (traffic annotations, the webhook's copy of istio-init's args) decides
whether or how it checks. A plan made for other IDs than this process runs as, a plan that
says skip, or none at all is logged with its reason and passes without the check (the agent has
read the rules back from the kernel); only a successful probe is reported as a proven redirect.

Nothing here writes a file. Every outcome is one line, and an exit status (see ``cli``).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from . import names
from .bounded import BoundedJsonError, loads_bounded
from .handoff import Client as HandoffClient
from .nscookie import own_netns_cookie
from .podinfo import PodinfoFormatError, read_annotations
from .probe import VERIFY_KEY, PlanError, Probe, Skip, check_for, read_plan

DEFAULT_TIMEOUT = 300.0
POLL_INTERVAL = 0.05  # without inotify
RESCAN_INTERVAL = 1.0  # with inotify: re-read anyway, in case an event was missed
NETNS_PATH = "/proc/self/ns/net"

DEFAULT_VERIFY_TIMEOUT = 5.0
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
TOKEN_BYTES = 16


# -- what the annotations say ----------------------------------------------------------------
# (Plain classes, not dataclasses: ``dataclasses`` costs every pod's start ~9 ms of imports.)


class _Value:
    """Equal to a value of the same class with the same fields; immutable by convention."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, _Value) and other._fields() == self._fields()

    def __hash__(self) -> int:
        return hash((type(self), *map(repr, self._fields())))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={v!r}" for n, v in zip(self.__slots__, self._fields(), strict=True))
        return f"{type(self).__name__}({inner})"


class Waiting(_Value):
    """Not there yet; ``reason`` says what was seen instead (for the timeout line)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Initialized(_Value):
    """The mark for this namespace; ``source`` is where it was seen: the downward-API file
    (``file``) or the agent's hand-off (``handoff``)."""

    __slots__ = ("detail", "source")

    def __init__(self, detail: Mapping[str, Any], source: str = "file") -> None:
        self.detail, self.source = detail, source


class AgentFailed(_Value):
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Verdict = Waiting | Initialized | AgentFailed


def _detail(annotations: Mapping[str, str]) -> tuple[dict[str, Any] | None, str]:
    raw = annotations.get(names.DETAIL)
    if raw is None:
        return None, f"{names.DETAIL} is absent"
    try:
        detail = loads_bounded(raw, max_bytes=names.MAX_DETAIL_BYTES, what=names.DETAIL)
    except BoundedJsonError as exc:
        return None, str(exc)
    if not isinstance(detail, dict):
        return None, f"{names.DETAIL} is not a JSON object"
    return detail, ""


def _inode_of(detail: Mapping[str, Any]) -> int | None:
    inode = detail.get("netnsInode")
    return inode if isinstance(inode, int) and not isinstance(inode, bool) else None


def _earlier_cookie(detail: Mapping[str, Any], cookie: int | None) -> int | None:
    """The mark's namespace cookie when it is not ours: a mark for an earlier sandbox whose
    namespace had the same inode number. (A mark without one, or a kernel without cookies,
    leaves the inode alone to decide.)"""
    marked = detail.get("netnsCookie")
    if cookie is None or not isinstance(marked, int) or isinstance(marked, bool) or marked == cookie:
        return None
    return marked


def judge_mark(annotations: Mapping[str, str], netns_inode: int, netns_cookie: int | None = None) -> Verdict:
    """The agent's mark, judged for the network namespace this process is in (its inode number
    and, where the kernel has them, its cookie)."""
    status = annotations.get(names.STATUS)
    if status is None:
        return Waiting(f"{names.STATUS} is absent")
    if status == names.STATUS_INITIALIZED:
        detail, problem = _detail(annotations)
        if detail is None:
            return Waiting(f"{names.STATUS} is {status!r} but {problem}")
        inode = _inode_of(detail)
        if inode is None:
            return Waiting(f"{names.STATUS} is {status!r} but its detail has no integer netnsInode")
        if inode != netns_inode:
            return Waiting(
                f"{names.STATUS} is {status!r} for network namespace {inode}, an earlier sandbox "
                f"(ours is {netns_inode})"
            )
        if _earlier_cookie(detail, netns_cookie) is not None:
            return Waiting(
                f"{names.STATUS} is {status!r} for an earlier sandbox whose network namespace had the "
                f"same number {inode} (its cookie is not ours)"
            )
        return Initialized(detail)
    if status == names.STATUS_ERROR:
        detail, _ = _detail(annotations)
        detail = detail or {}
        inode = _inode_of(detail)
        if inode is not None and inode != netns_inode:
            return Waiting(f"{names.STATUS} is {status!r} for network namespace {inode}, an earlier sandbox")
        if _earlier_cookie(detail, netns_cookie) is not None:
            return Waiting(f"{names.STATUS} is {status!r} for an earlier sandbox (its cookie is not ours)")
        reason = detail.get("error")
        text = reason if isinstance(reason, str) and reason.strip() else "(the agent gave no reason)"
        text = " ".join(text.split())  # one line, whatever the annotation holds
        if detail.get("reason") == "ApplyFailed":
            # The agent retries these itself (a namespace not ready, a busy lock): failing now
            # would fail a restartPolicy Never pod for good, or cost the kubelet's back-off.
            return Waiting(f"the node agent is retrying: {text}")
        return AgentFailed(text)
    return Waiting(f"{names.STATUS} is {status[:80]!r}, not {names.STATUS_INITIALIZED!r}")


# -- waiting for a change --------------------------------------------------------------------


class Watcher(Protocol):
    def wait(self, timeout: float, also: int | None = None) -> None:
        """Return when the watched file may have changed, when ``also`` (a file descriptor) is
        readable, or after ``timeout`` seconds."""

    def close(self) -> None: ...


class PollingWatcher:
    def __init__(self, interval: float = POLL_INTERVAL, sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = interval
        self._sleep = sleep

    def wait(self, timeout: float, also: int | None = None) -> None:
        wait = max(0.0, min(timeout, self.interval))
        if also is None:
            self._sleep(wait)
        else:
            select.select([also], [], [], wait)

    def close(self) -> None:
        pass


class InotifyWatcher:
    """Wakes on any change in the file's directory: the kubelet's atomic writer renames a new
    ``..data`` symlink into place, which shows as IN_MOVED_TO there."""

    def __init__(self, directory: str, rescan: float = RESCAN_INTERVAL) -> None:
        from inotify_simple import INotify, flags  # type: ignore[import-untyped]

        self.rescan = rescan
        self._inotify = INotify()
        mask = (
            flags.CREATE
            | flags.MOVED_TO
            | flags.MOVED_FROM
            | flags.CLOSE_WRITE
            | flags.MODIFY
            | flags.DELETE
            | flags.ATTRIB
            | flags.DELETE_SELF
            | flags.MOVE_SELF
        )
        try:
            self._inotify.add_watch(directory, mask)
        except OSError:
            self._inotify.close()
            raise

    def wait(self, timeout: float, also: int | None = None) -> None:
        wait = max(0.0, min(timeout, self.rescan))
        if also is None:
            self._inotify.read(timeout=int(wait * 1000))
            return
        ready, _, _ = select.select([self._inotify.fileno(), also], [], [], wait)
        if self._inotify.fileno() in ready:
            self._inotify.read(timeout=0)  # drain: the events only say "look again"

    def close(self) -> None:
        self._inotify.close()


class LazyWatcher:
    """Makes the real watcher at the first wait and returns at once: the caller reads again with
    the watch in place, so a change between its first read and the watch is not missed. A waiter
    whose mark is there at its first look never loads inotify (some ms of the pod's start)."""

    def __init__(self, make: Callable[[], Watcher]) -> None:
        self._make = make
        self._real: Watcher | None = None

    def wait(self, timeout: float, also: int | None = None) -> None:
        if self._real is None:
            self._real = self._make()
            return
        self._real.wait(timeout, also)

    def close(self) -> None:
        if self._real is not None:
            self._real.close()


def make_watcher(path: str, *, log: Callable[[str], None]) -> Watcher:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        return InotifyWatcher(directory)
    except (OSError, ImportError) as exc:
        log(f"inotify unavailable for {directory} ({exc}); polling every {int(POLL_INTERVAL * 1000)} ms")
        return PollingWatcher()


# -- the outcome -----------------------------------------------------------------------------


class WaitFailed(Exception):
    """Why the waiter gives up; the message is the one exit line (without the program name)."""

    def __init__(self, message: str, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(message)


def netns_inode(path: str = NETNS_PATH) -> int:
    return os.stat(path).st_ino


def wait_for_mark(
    path: str,
    *,
    inode: int,
    cookie: int | None = None,
    timeout: float,
    watcher: Watcher,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = lambda line: None,
    handoff: HandoffClient | None = None,
) -> tuple[Initialized, Mapping[str, str]]:
    """Block until the file, or the agent's hand-off (``handoff``), shows our namespace
    initialized; returns the mark and the annotations it was read from.

    Raises WaitFailed: exit 1 on the agent's error state or on timeout, 2 when the file is not
    in the kubelet's format (the kubelet never writes such a file; waiting would not help).
    The hand-off can only let the pod go: an error or a mark for another namespace there is
    logged and left to the file (the agent hands over ``initialized`` marks only).
    """
    deadline = clock() + timeout
    last: str = ""
    last_handoff: str = ""
    while True:
        if handoff is not None:
            handed = handoff.poll()
            if handed is not None:
                verdict = judge_mark(handed, inode, cookie)
                if isinstance(verdict, Initialized):
                    return Initialized(verdict.detail, source="handoff"), handed
                said = f"the agent's hand-off: {getattr(verdict, 'reason', verdict)}"
            else:
                said = f"the agent's hand-off: {handoff.last_problem}" if handoff.last_problem else ""
            if said and said != last_handoff:
                log(f"ignored: {said}")
            last_handoff = said or last_handoff
        try:
            annotations = read_annotations(path)
        except FileNotFoundError:
            annotations, seen = None, f"{path} does not exist"
        except PodinfoFormatError as exc:
            raise WaitFailed(f"cannot read the pod's annotations in {path}: {exc}", 2) from None
        except OSError as exc:
            annotations, seen = None, f"cannot read {path}: {exc.strerror or exc}"
        if annotations is not None:
            found = judge_mark(annotations, inode, cookie)
            if isinstance(found, Initialized):
                return found, annotations
            if isinstance(found, AgentFailed):
                raise WaitFailed(f"the node agent could not program this pod: {found.reason}", 1)
            seen = found.reason
        if seen != last:
            log(f"waiting: {seen}")
        last = seen
        remaining = deadline - clock()
        if remaining <= 0:
            raise WaitFailed(
                f"timed out after {timeout:g}s waiting for {names.STATUS}={names.STATUS_INITIALIZED} "
                f"for network namespace {inode} in {path} (last seen: {seen})",
                1,
            )
        if handoff is None:
            watcher.wait(remaining)
        else:
            watcher.wait(min(remaining, handoff.due_in()), also=handoff.fileno())


# -- proving the redirect --------------------------------------------------------------------


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), int(port)


def has_local_route(address: str, port: int) -> bool:
    """True when this namespace routes ``address`` anywhere: a UDP connect looks the route up
    and sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, port))
        except OSError as exc:
            if exc.errno == errno.ENETUNREACH:
                return False
            raise
    return True


def prove_redirect(probe: Probe, *, timeout: float = DEFAULT_VERIFY_TIMEOUT) -> str:
    """Listen on the proxy port, connect to the probe address, and require our token and the
    original destination back. Returns a summary; raises WaitFailed (exit 1)."""
    target = f"{probe.address}:{probe.port}"
    token = os.urandom(TOKEN_BYTES).hex().encode()  # as secrets.token_hex, without its imports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("0.0.0.0", probe.proxy_port))  # where REDIRECT delivers
        except OSError as exc:
            reason = exc.strerror or exc
            message = f"redirect check: cannot listen on the proxy port {probe.proxy_port}: {reason}"
            raise WaitFailed(message, 1) from None
        listener.listen(1)
        listener.settimeout(timeout)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            try:
                client.connect((probe.address, probe.port))
            except OSError as exc:
                if exc.errno == errno.ENETUNREACH and not has_local_route(probe.address, probe.port):
                    # No IPv4 route at all: an IPv6-only pod. The kernel refuses before netfilter
                    # sees the packet, so this proves nothing either way (the check is IPv4).
                    # (With a route, ENETUNREACH is a router's ICMP answer: the connection left
                    # the pod, so it was not redirected.)
                    return f"redirect check skipped: no IPv4 route to {target} in this pod (IPv6-only?)"
                raise WaitFailed(
                    f"redirect check failed: connecting to {target} did not reach the local listener on "
                    f"port {probe.proxy_port} ({exc.strerror or exc}): outbound traffic is not redirected",
                    1,
                ) from None
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                raise WaitFailed(
                    f"redirect check failed: a connection to {target} succeeded but never reached the "
                    f"listener on port {probe.proxy_port}: something else answered for {target}",
                    1,
                ) from None
            with conn:
                try:
                    original = _original_dst(conn)
                    conn.sendall(token)
                except OSError as exc:
                    message = f"redirect check failed: no original destination for the connection to {target}"
                    raise WaitFailed(f"{message} ({exc.strerror or exc}): it was not redirected", 1) from None
            received = b""
            try:
                while len(received) < len(token):
                    chunk = client.recv(len(token) - len(received))
                    if not chunk:
                        break
                    received += chunk
            except OSError as exc:
                raise WaitFailed(f"redirect check failed: reading the token back: {exc}", 1) from None
    if received != token:
        raise WaitFailed(f"redirect check failed: the connection to {target} did not carry our token", 1)
    if original != (probe.address, probe.port):
        raise WaitFailed(
            f"redirect check failed: the listener saw original destination {original[0]}:{original[1]}, "
            f"not {target}",
            1,
        )
    return f"outbound redirect proven: {target} reached the proxy port {probe.proxy_port}"


# -- the whole run ---------------------------------------------------------------------------


class Options(NamedTuple):
    file: str = names.ANNOTATIONS_FILE
    timeout: float = DEFAULT_TIMEOUT
    verify: bool = False
    verify_timeout: float = DEFAULT_VERIFY_TIMEOUT
    netns_path: str = NETNS_PATH
    handoff: bool = True  # also take the mark from the agent in this namespace (see ``handoff``)


def run(
    options: Options,
    *,
    log: Callable[[str], None],
    watcher: Watcher | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> tuple[int, str]:
    """Wait (and verify); returns the exit code and the one exit line (without program name)."""
    try:
        inode = netns_inode(options.netns_path)
        # The cookie is this process's own namespace's: it speaks for netns_path only when that
        # is our own (always, but in tests that point the waiter at another namespace's file).
        cookie = own_netns_cookie() if options.netns_path == NETNS_PATH else None
    except OSError as exc:
        return 1, f"cannot read this container's network namespace {options.netns_path}: {exc}"
    log(
        f"waiting up to {options.timeout:g}s for {names.STATUS}={names.STATUS_INITIALIZED} "
        f"for network namespace {inode} (reading {options.file})"
    )
    own_watcher = watcher is None
    active = watcher or LazyWatcher(lambda: make_watcher(options.file, log=log))
    # Only in our own namespace: the hand-off's name is that namespace's (see ``handoff``).
    client = HandoffClient() if options.handoff and options.netns_path == NETNS_PATH else None
    try:
        mark, _ = wait_for_mark(
            options.file,
            inode=inode,
            cookie=cookie,
            timeout=options.timeout,
            watcher=active,
            log=log,
            handoff=client,
        )
    except WaitFailed as exc:
        return exc.exit_code, str(exc)
    finally:
        if own_watcher:
            active.close()
        if client is not None:
            client.close()
    how = "handed over by the agent" if mark.source == "handoff" else f"read from {options.file}"
    line = f"pod initialized for network namespace {inode}, mark {how}" + _applied(mark.detail)
    if not options.verify:
        return 0, line
    check = planned_check(mark.detail, uid=os.getuid() if uid is None else uid,
                          gid=os.getgid() if gid is None else gid)  # fmt: skip
    if isinstance(check, Skip):
        log(f"redirect check skipped: {check.reason}; relying on the agent's read-back of the rules")
        return 0, line + "; redirect check skipped (relying on the agent's read-back of the rules)"
    try:
        proof = prove_redirect(check, timeout=options.verify_timeout)
    except WaitFailed as exc:
        return exc.exit_code, str(exc)
    return 0, f"{line}; {proof}"


def planned_check(detail: Mapping[str, Any], *, uid: int, gid: int) -> Probe | Skip:
    """The probe the agent planned in its detail for a waiter running as ``uid``/``gid``, or why
    there is none. Reads nothing but ``detail["verify"]``."""
    if VERIFY_KEY not in detail:
        return Skip(
            f"the agent's mark has no probe plan ({names.DETAIL} has no {VERIFY_KEY!r}; an older agent?)"
        )
    try:
        plan = read_plan(detail[VERIFY_KEY])
    except PlanError as exc:
        return Skip(f"the agent's probe plan is not usable: {exc}")
    return check_for(plan, uid=uid, gid=gid)


# The modes an agent writes in the detail's "mode"; anything else in that key is not repeated.
KNOWN_MODES = ("iptables", "nftables")


def _applied(detail: Mapping[str, Any]) -> str:
    parts = []
    mode = detail.get("mode")
    if mode in KNOWN_MODES:
        parts.append(f"{mode} mode")
    sha = detail.get("rulesetSha256")
    if isinstance(sha, str) and sha:
        parts.append(f"ruleset {sha[:12]}")
    at = detail.get("appliedAt")
    if isinstance(at, str) and at:
        parts.append(f"applied {at}")
    return f" ({', '.join(parts)})" if parts else ""
