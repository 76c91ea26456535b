"""The admission server: AdmissionReview v1 over TLS on ``/mutate``, plus ``/healthz``, ``/readyz``.

Why aiohttp: an admission webhook is a small HTTP server on the pod-creation path of the whole
cluster, so it must hold up against whatever reaches its port and keep serving. aiohttp is a
maintained HTTP/1.1 server on asyncio (which the namespace lookups need anyway) with request size
limits; the standard library's ``http.server`` is documented as not meant for production.

Bounded cost: the port is reachable by anything in the cluster network, without a token, so no
client may stall the server for the API server (see docs/waiter-and-webhook.md, "Bounded cost"):

- connections are accepted here, not by ``create_server``, so each one is known from ``accept``
  on: the TLS handshake has ``--tls-handshake-timeout``; a request (headers and body) must arrive
  within ``--read-timeout`` of its first byte, and a new connection's first request within that
  long of the handshake; a kept-alive connection may idle ``--idle-timeout``. At
  ``--max-connections`` the connection that made progress (accepted, or answered a request) least
  recently and has no request in flight is closed for the new one: idle sockets held by someone
  cannot lock the API server out. Only when every connection has a request in flight is the new
  one refused;
- request bodies held at once are bounded in bytes (the smallest request waits least), a body
  over ``--max-request-bytes`` is refused before it is read;
- decoding and deciding run on one worker thread, cheapest request first, never on the event
  loop; a request not answered within ``--request-timeout`` gets a 500, so the
  MutatingWebhookConfiguration's ``failurePolicy`` decides, before the API server gives up;
- malformed input gets one log line and a 4xx; anything unexpected one log line and a 500, never
  a traceback.

Certificates are reloaded without a restart (cert-manager rotates them in place): the files are
re-read every second, a new TLS context is built only from a pair that loads, and every new
connection is handed the current one from the listening context's SNI callback (which OpenSSL
calls for every handshake, SNI or not), so a half-written rotation never breaks the server.

The namespace: the decision needs the pod's namespace (its opt-in annotation or label), which an
AdmissionReview does not carry. It is read from the API (``GET namespaces/NAME``, cached for a
few seconds, concurrent lookups of one name shared) and only when it can change the answer, i.e.
when the pod is ours but for its opt-in. If it cannot be read, the webhook answers 500, so that
the MutatingWebhookConfiguration's failurePolicy -- the administrator's choice -- decides.
``--namespace-lookup=off`` is the alternative: only the pod's own opt-in and the waiter count.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import heapq
import itertools
import json
import logging
import queue
import resource
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from .bounded import MAX_JSON_DEPTH, BoundedJsonError, loads_bounded
from .decide import decide
from .inject import Denied, Patch, Unchanged, WaiterSettings, mutate_pod
from .names import OPT_IN, OPT_IN_VALUE
from .podfacts import NamespaceFacts, PodFacts, namespace_facts, pod_facts

log = logging.getLogger("istio_pod_network_controller.webhook")

ADMISSION_API = "admission.k8s.io/v1"
# The API server refuses request bodies over 3 MiB, and etcd stores no object over 1.5 MiB; an
# AdmissionReview carries the object re-encoded as JSON (quotes, defaults) plus its envelope, so a
# third more than the API server's limit refuses nothing that could ever be created.
MAX_REVIEW_BYTES = 4 * 1024 * 1024
# JSON values in one body, bounded before decoding by counting what precedes each (a comma, or an
# opening bracket or brace; commas inside strings count too, so this is an upper bound): decoding
# turns each into a Python object of 24 to 200 bytes, so this bounds the memory one decoded review
# takes to tens of MiB (a 4 MiB body of "1.5," would otherwise take 32 MiB, of {} 60 MiB). A pod
# with 24,000 istio-init arguments has 50,000.
MAX_REVIEW_VALUES = 250_000
DEFAULT_PORT = 9443
DEFAULT_NAMESPACE_TTL = 5.0
# Namespaces remembered at once (a request names any namespace it likes).
NAMESPACE_CACHE_ENTRIES = 4096
TLS_RELOAD_INTERVAL = 1.0
JSON_TYPE = "application/json"

# A connection takes about 42 KiB idle and up to about 120 KiB with a request arriving (see the
# buffer limits below): 512 of them fit beside the bodies and one decoded review in the chart's
# memory limit. At the cap, idle ones give way to new ones.
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 60.0
# Below the chart's timeoutSeconds (10): the API server gets our 500, not its own timeout.
DEFAULT_REQUEST_TIMEOUT = 8.0
# File descriptors kept for what is not a client connection (listening socket, logs, the TLS
# files read every second, the API client's connections).
FD_RESERVE = 64
# Larger bodies held at once, in multiples of the largest one accepted.
BUFFERED_BODIES = 4
# A body this small (an ordinary review is 5 to 30 KiB) is read at once, without waiting for the
# budget of larger ones: clients holding that budget with slow bodies cannot delay it. What such
# bodies take is bounded by the connection cap (512 x 64 KiB).
SMALL_BODY = 64 * 1024
# How long a closed TLS connection waits for the client's close_notify before its socket goes.
TLS_SHUTDOWN_TIMEOUT = 2.0
# How long the server keeps reading (and dropping) a body it answered without reading.
LINGER_SECONDS = 1.0
# asyncio reads TLS through a 256 KiB buffer per connection, zero-filled and so resident at once:
# a thousand idle connections would take 256 MiB. 16 KiB is one TLS record.
TLS_READ_BUFFER = 16 * 1024
# What one connection may have received and not yet consumed, at each layer: asyncio's TLS (256
# KiB by default) and aiohttp's body buffer (twice this; 128 KiB by default), past which reading
# pauses; and the request head (aiohttp's parser keeps all of it until the blank line). The API
# server sends a few headers of a few hundred bytes.
TLS_READ_HIGH_WATER = 16 * 1024
HTTP_READ_BUFFER = 8 * 1024
# aiohttp's parser keeps about 2.5 times the bytes of a request head until its blank line: a
# connection sending heads within aiohttp's own limits (128 headers of 8 KiB) held 530 KiB of
# memory each. So a head may have 16 KiB in all (counted here) and aiohttp's limits are cut to
# 16 headers of 4 KiB for the heads the count does not see (pipelined behind a request).
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 16
MAX_HEADER_BYTES = 4096
LISTEN_BACKLOG = 1024
WARN_EVERY = 10.0

T = TypeVar("T")

# -- the request ---------------------------------------------------------------------------------


class BadReview(Exception):
    """A request that is not a well-formed AdmissionReview; answered with ``status`` (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    api_version: str
    group: str
    version: str
    kind: str
    resource: str
    sub_resource: str
    operation: str
    namespace: str
    dry_run: bool
    object: Mapping[str, Any] | None
    # The object's facts, read once for the review (which may be answered twice: before and after
    # its namespace is read).
    pod: PodFacts = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pod", pod_facts(self.object))

    @property
    def is_pod_creation(self) -> bool:
        return (
            (self.group, self.version, self.kind) == ("", "v1", "Pod")
            and self.resource in ("", "pods")
            and not self.sub_resource
            and self.operation == "CREATE"
        )


def _string(obj: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise BadReview(400, f"{where}.{key} must be a non-empty string")
    return value


def parse_review(body: bytes, content_type: str, *, max_bytes: int = MAX_REVIEW_BYTES) -> AdmissionRequest:
    """Raw request -> AdmissionRequest; raises BadReview naming what is wrong. CPU-bound (linear
    in the body): the server calls it off the event loop."""
    if content_type != JSON_TYPE:
        raise BadReview(415, f"Content-Type must be {JSON_TYPE}, not {content_type[:80]!r}")
    if len(body) > max_bytes:
        raise BadReview(413, f"body is larger than {max_bytes} bytes")
    values = body.count(b"{") + body.count(b"[") + body.count(b",")
    if values > MAX_REVIEW_VALUES:
        raise BadReview(400, f"body has up to {values} JSON values, more than {MAX_REVIEW_VALUES}")
    try:
        doc = loads_bounded(body, max_bytes=max_bytes, max_depth=MAX_JSON_DEPTH, what="body")
    except BoundedJsonError as exc:
        raise BadReview(400, str(exc)) from None
    if not isinstance(doc, dict):
        raise BadReview(400, "body must be a JSON object (an AdmissionReview)")
    if doc.get("apiVersion") != ADMISSION_API or doc.get("kind") != "AdmissionReview":
        raise BadReview(400, f"expected apiVersion {ADMISSION_API} and kind AdmissionReview")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadReview(400, "request is missing or not an object")
    uid = _string(request, "uid", "request", required=True)
    kind = request.get("kind")
    if not isinstance(kind, dict):
        raise BadReview(400, "request.kind is missing or not an object")
    resource = request.get("resource")
    resource = resource if isinstance(resource, dict) else {}
    dry_run = request.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise BadReview(400, "request.dryRun must be true or false")
    obj = request.get("object")
    if obj is not None and not isinstance(obj, dict):
        raise BadReview(400, "request.object must be an object")
    parsed = AdmissionRequest(
        uid=uid,
        api_version=ADMISSION_API,
        group=_string(kind, "group", "request.kind"),
        version=_string(kind, "version", "request.kind", required=True),
        kind=_string(kind, "kind", "request.kind", required=True),
        resource=_string(resource, "resource", "request.resource"),
        sub_resource=_string(request, "subResource", "request"),
        operation=_string(request, "operation", "request", required=True),
        namespace=_string(request, "namespace", "request"),
        dry_run=dry_run,
        object=obj,
    )
    if parsed.is_pod_creation:
        if obj is None:
            raise BadReview(400, "request.object is missing for a pod CREATE")
        _check_pod_shape(obj)
    return parsed


def _check_pod_shape(pod: Mapping[str, Any]) -> None:
    """The fields the mutation reads have the types the Pod schema gives them (the API server
    sends nothing else; anyone else gets a 400 naming the field)."""
    metadata = pod.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BadReview(400, "request.object.metadata must be an object")
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise BadReview(400, "request.object.metadata.annotations must map strings to strings")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise BadReview(400, "request.object.spec must be an object")
    for key in ("containers", "initContainers", "volumes"):
        items = spec.get(key)
        if items is not None and not (isinstance(items, list) and all(isinstance(i, dict) for i in items)):
            raise BadReview(400, f"request.object.spec.{key} must be a list of objects")


def review_response(
    uid: str, *, allowed: bool = True, patch: list[dict[str, Any]] | None = None, message: str = ""
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if not allowed:
        response["status"] = {"code": 400, "reason": "BadRequest", "message": message}
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": response}


# -- the namespace ---------------------------------------------------------------------------------


class NamespaceLookupError(Exception):
    pass


class Namespaces(Protocol):
    async def get(self, name: str) -> Mapping[str, Any] | None:
        """The Namespace object, None when it does not exist; raises NamespaceLookupError."""


class NoNamespaces:
    """``--namespace-lookup=off``: namespaces are known by name only."""

    async def get(self, name: str) -> Mapping[str, Any] | None:
        return None


Fetch = Callable[[str], Awaitable[Mapping[str, Any] | None]]


class CachedNamespaces:
    """Namespaces read through ``fetch``, kept ``ttl`` seconds; one fetch per name at a time. At
    most ``max_entries`` are kept (the names come from requests anyone can send): expired ones go
    first, then the oldest."""

    def __init__(
        self, fetch: Fetch, *, ttl: float = DEFAULT_NAMESPACE_TTL, max_entries: int = NAMESPACE_CACHE_ENTRIES
    ) -> None:
        self._fetch = fetch
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, Mapping[str, Any] | None]] = {}
        self._inflight: dict[str, asyncio.Future[Mapping[str, Any] | None]] = {}

    async def get(self, name: str) -> Mapping[str, Any] | None:
        cached = self._cache.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pending = self._inflight.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Mapping[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        try:
            found = await self._fetch(name)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody else must
            raise
        else:
            self._remember(name, found)
            future.set_result(found)
            return found
        finally:
            del self._inflight[name]

    def _remember(self, name: str, found: Mapping[str, Any] | None) -> None:
        now = time.monotonic()
        self._cache.pop(name, None)
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        while len(self._cache) >= self.max_entries:
            del self._cache[next(iter(self._cache))]
        self._cache[name] = (now + self.ttl, found)

    def __len__(self) -> int:
        return len(self._cache)


def api_namespace_fetch(api: Any) -> Fetch:
    """GET /api/v1/namespaces/NAME through ``cluster.api.Api``."""
    from .cluster.api import ApiError

    async def fetch(name: str) -> Mapping[str, Any] | None:
        try:
            found: Mapping[str, Any] = await api.get(f"/api/v1/namespaces/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise NamespaceLookupError(f"cannot read namespace {name}: {exc}") from exc
        return found

    return fetch


# -- the decision ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What to send back: an HTTP status and a JSON (or text) body."""

    status: int
    body: dict[str, Any] | str

    def encoded(self) -> Reply:
        if isinstance(self.body, str):
            return Reply(self.status, self.body.encode(), "text/plain")
        return Reply(self.status, json.dumps(self.body).encode(), JSON_TYPE)


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer as bytes (encoding a large patch is work too: it is done off the event loop)."""

    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class NeedNamespace:
    """The answer depends on this namespace's opt-in: read it, then decide again."""

    name: str


def _namespace_could_opt_in(pod: PodFacts, name: str, settings: WaiterSettings) -> bool:
    """Whether the namespace's opt-in would make this pod ours (if not, no lookup is needed)."""
    opted = NamespaceFacts(name, annotations={OPT_IN: OPT_IN_VALUE})
    return decide(pod, opted, excluded_namespaces=settings.excluded_namespaces).ours


def _is_namespace_name(name: str) -> bool:
    """A DNS-1123 label, what every namespace name is (and so safe in an API path)."""
    return (
        0 < len(name) <= 63
        and name.isascii()
        and name.replace("-", "").isalnum()
        and (name == name.lower() and name[0] != "-" and name[-1] != "-")
    )


def answer_review(
    request: AdmissionRequest, settings: WaiterSettings, namespace: NamespaceFacts | None
) -> Answer | NeedNamespace:
    """The answer to a parsed review (pure and CPU-bound). ``namespace`` None: not read yet, and
    NeedNamespace when it matters; otherwise the Namespace (its name only for one that does not
    exist)."""
    # A dry run gets the same answer as the real request: the mutation has no side effects
    # (sideEffects: None), and `kubectl apply --dry-run=server` should show the pod as it would be.
    if not request.is_pod_creation:
        return Answer(200, review_response(request.uid))
    pod = request.pod
    ns_name = request.namespace or pod.namespace
    if namespace is None:
        namespace = NamespaceFacts(ns_name)
        if not decide(pod, namespace, excluded_namespaces=settings.excluded_namespaces).ours and (
            _namespace_could_opt_in(pod, ns_name, settings)
        ):
            if not _is_namespace_name(ns_name):
                message = f"request.namespace {ns_name[:80]!r} is not a namespace name"
                log.warning("bad request", extra={"status": 400, "error": message})
                return Answer(400, message + "\n")
            return NeedNamespace(ns_name)
    pod_name = pod.name or pod.generate_name
    fields: dict[str, object] = {"pod": f"{ns_name}/{pod_name}"[:300], "uid": request.uid[:80]}
    if request.dry_run:
        fields["dryRun"] = True
    mutation = mutate_pod(pod, namespace, settings)
    if isinstance(mutation, Patch):
        log.info("pod mutated", extra={**fields, "changes": mutation.summary})
        return Answer(200, review_response(request.uid, patch=list(mutation.ops)))
    if isinstance(mutation, Denied):
        log.warning("pod denied", extra={**fields, "reason": mutation.message[:1000]})
        return Answer(200, review_response(request.uid, allowed=False, message=mutation.message))
    assert isinstance(mutation, Unchanged)
    log.debug("pod left alone", extra={**fields, "reason": mutation.reason})
    return Answer(200, review_response(request.uid))


async def lookup_namespace(namespaces: Namespaces, name: str) -> NamespaceFacts | Answer:
    """The Namespace, or the 500 that lets the failure policy decide when it cannot be read."""
    try:
        return namespace_facts(await namespaces.get(name)) or NamespaceFacts(name)
    except NamespaceLookupError as exc:
        log.error("namespace lookup failed", extra={"namespace": name, "error": str(exc)})
        return Answer(500, f"{exc}\n")


async def admit(request: AdmissionRequest, settings: WaiterSettings, namespaces: Namespaces) -> Answer:
    """``answer_review`` with the namespace read when it matters (on the calling loop; the server
    runs the two halves on its worker thread instead)."""
    first = answer_review(request, settings, None)
    if isinstance(first, Answer):
        return first
    namespace = await lookup_namespace(namespaces, first.name)
    if isinstance(namespace, Answer):
        return namespace
    second = answer_review(request, settings, namespace)
    assert isinstance(second, Answer)
    return second


def review_reply(
    body: bytes,
    content_type: str,
    settings: WaiterSettings,
    namespace: NamespaceFacts | None,
    *,
    max_bytes: int = MAX_REVIEW_BYTES,
) -> Reply | NeedNamespace:
    """Body bytes to reply bytes: what the server's worker thread runs. A bad body is one log line
    and its 4xx. A review whose answer needs its namespace is decoded again once that is read,
    rather than kept: the worker then holds one decoded review at a time, whatever the number of
    lookups in flight."""
    try:
        request = parse_review(body, content_type, max_bytes=max_bytes)
    except BadReview as exc:
        log.warning("bad request", extra={"status": exc.status, "error": str(exc)})
        return Reply(exc.status, f"{exc}\n".encode(), "text/plain")
    answer = answer_review(request, settings, namespace)
    return answer if isinstance(answer, NeedNamespace) else answer.encoded()


# -- TLS -------------------------------------------------------------------------------------------


class TlsFiles:
    """The serving certificate and key, reloaded when the files change (see module docstring)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._in_use: tuple[bytes, bytes] | None = None  # the files' bytes of the pair being served
        self.current = self._load()
        self.listening = self._context()
        self.listening.sni_callback = self._choose
        self.reloads = 0

    def _read(self) -> tuple[bytes, bytes]:
        return Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes()

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.2 renegotiation lets a client make the server redo the handshake's work at will.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def _load(self) -> ssl.SSLContext:
        on_disk = self._read()
        ctx = self._context()
        self._in_use = on_disk
        return ctx

    def _choose(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        conn.context = self.current

    def reload_if_changed(self) -> bool:
        """Swap in the files' pair when it changed and loads; keep the old one otherwise."""
        try:
            on_disk = self._read()
        except OSError as exc:
            log.warning("cannot read the TLS files; keeping the current pair", extra={"error": str(exc)})
            return False
        if on_disk == self._in_use:
            return False
        try:
            fresh = self._context()
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "new TLS files do not load (yet); keeping the current pair", extra={"error": str(exc)}
            )
            return False
        self.current, self._in_use = fresh, on_disk
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert": self.cert_file})
        return True


# -- bounded resources -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's bounds (the ``webhook`` flags of the same names)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_request_bytes: int = MAX_REVIEW_BYTES

    @property
    def buffered_bytes(self) -> int:
        return BUFFERED_BODIES * self.max_request_bytes


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, as Go's runtime does at start
    (container runtimes set the soft limit to 1024, which a thousand idle clients would use up);
    returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft
        return target
    return soft


def connection_cap(wanted: int) -> int:
    """``wanted``, or fewer when the open-files limit would run out first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


def _small_tls_read_buffers() -> None:
    """See TLS_READ_BUFFER. asyncio's SSLProtocol takes its buffer size from this class attribute
    (a larger read is simply split); without it the attribute is left alone."""
    from asyncio import sslproto

    if getattr(sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


@dataclass(eq=False)
class _Job:
    work: Callable[[], object]
    future: asyncio.Future[object]
    loop: asyncio.AbstractEventLoop
    abandoned: bool = False


class WorkerLane:
    """CPU-bound work off the event loop: ``threads`` threads (one by default: Python threads
    share one interpreter anyway), the cheapest job first, so a small review never waits behind a
    queue of huge ones, only behind the one being worked on. A job whose caller stopped waiting
    (its deadline passed) is dropped unstarted; a started one runs to its end (bounded by the
    parsers' own limits)."""

    def __init__(self, threads: int = 1) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"ipnc-webhook-worker-{i}", daemon=True)
            for i in range(threads)
        ]
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            for thread in self._threads:
                thread.start()

    async def run(self, cost: int, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        job = _Job(work, loop.create_future(), loop)
        self._queue.put((cost, next(self._order), job))
        try:
            result: T = await job.future  # type: ignore[assignment]
            return result
        finally:
            job.abandoned = True

    def _work(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            if job.abandoned:
                continue
            try:
                result = job.work()
            except BaseException as exc:  # handed to the waiting request, which reports it
                self._settle(job, None, exc)
            else:
                self._settle(job, result, None)

    @staticmethod
    def _settle(job: _Job, result: object, exc: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            job.loop.call_soon_threadsafe(settle)

    def close(self, timeout: float = 5.0) -> None:
        for _ in self._threads:
            self._queue.put((-1, next(self._order), None))
        if self.started:
            for thread in self._threads:
                thread.join(timeout)


class ByteBudget:
    """Request body bytes held at once, across all requests. A request reserves its announced
    length before reading it; the smallest waiting reservation is granted first, so the API
    server's few-KiB reviews pass huge bodies that wait for room."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[int]:
        size = max(0, min(size, self.total))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (size, next(self._order), future))
        self._grant()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as the wait was cancelled
                self._release(size)
            raise
        try:
            yield size
        finally:
            self._release(size)

    def _release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, _, future = self._waiting[0]
            if future.done():  # given up waiting
                heapq.heappop(self._waiting)
                continue
            if self.used + size > self.total:
                return
            heapq.heappop(self._waiting)
            self.used += size
            future.set_result(None)


# -- connections -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    """One accepted connection. ``since``: accepted, or its last request answered -- what "least
    recent progress" is measured from; bytes received are not progress (a client can dribble)."""

    sock: socket.socket
    since: float
    transport: asyncio.BaseTransport | None = None
    handler: RequestHandler | None = None
    opener: asyncio.Task[None] | None = None
    opening: bool = False  # the opener runs: asyncio owns the socket now
    busy: int = 0  # requests being handled
    reading_since: float | None = None  # a request is arriving (or the first one is due) since
    head_open: bool = True  # the bytes coming are a request head (until its blank line)
    head_bytes: int = 0
    head_tail: bytes = b""  # the head's last bytes, to find a blank line split across reads
    closing_since: float | None = None

    @property
    def handshaking(self) -> bool:
        return self.transport is None


@dataclass
class ConnectionStats:
    accepted: int = 0
    evicted: int = 0
    refused: int = 0
    handshake_failed: int = 0
    closed_idle: int = 0
    closed_slow: int = 0
    closed_large_head: int = 0
    request_timeouts: int = 0
    peak: int = 0


class ConnectionTable:
    """Every accepted connection, from ``accept`` to its socket's close, ordered by last progress."""

    def __init__(self) -> None:
        self._by_progress: OrderedDict[_Conn, None] = OrderedDict()
        self.by_handler: dict[RequestHandler, _Conn] = {}
        self.stats = ConnectionStats()

    def __len__(self) -> int:
        return len(self._by_progress)

    def __iter__(self) -> Any:
        return iter(list(self._by_progress))

    def add(self, conn: _Conn) -> None:
        self._by_progress[conn] = None

    def progressed(self, conn: _Conn, now: float) -> None:
        """A request was answered: the next bytes are the next request's head."""
        conn.since = now
        conn.head_open, conn.head_bytes, conn.head_tail = True, 0, b""
        if conn in self._by_progress:
            self._by_progress.move_to_end(conn)

    def discard(self, conn: _Conn) -> None:
        self._by_progress.pop(conn, None)
        if conn.handler is not None:
            self.by_handler.pop(conn.handler, None)

    def victim(self) -> _Conn | None:
        """The connection to close for a new one: least recent progress, no request in flight."""
        return next((c for c in self._by_progress if c.busy == 0), None)

    def counts(self) -> dict[str, int]:
        handshaking = sum(1 for c in self._by_progress if c.handshaking)
        return {"connections": len(self._by_progress), "handshaking": handshaking}


def _close(conn: _Conn, now: float, *, at_once: bool) -> None:
    """Close gracefully (TLS close_notify; asyncio drops the socket after TLS_SHUTDOWN_TIMEOUT at
    the latest) or at once (the slot is needed now)."""
    if conn.handshaking:
        if conn.opener is not None:
            conn.opener.cancel()  # asyncio aborts a connection cancelled in its handshake
        if not conn.opening:
            conn.sock.close()  # the opener never ran, nothing else will close it
        return
    assert conn.transport is not None
    if at_once or conn.closing_since is not None:
        conn.transport.abort()  # type: ignore[attr-defined]
    else:
        conn.closing_since = now
        conn.transport.close()


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the connection's clocks kept up to date."""

    def __init__(self, inner: RequestHandler, conn: _Conn, table: ConnectionTable) -> None:
        self.inner, self.conn, self.table = inner, conn, table

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.transport = transport
        limits = getattr(transport, "set_read_buffer_limits", None)
        if limits is not None:
            limits(high=TLS_READ_HIGH_WATER)
        self.conn.reading_since = time.monotonic()  # the first request is due from now
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.closing_since is not None:
            return  # closed by us: nothing more is read
        if conn.busy == 0 and conn.reading_since is None:
            conn.reading_since = time.monotonic()
        if conn.head_open and conn.busy == 0:
            window = conn.head_tail + data
            end = window.find(b"\r\n\r\n")
            conn.head_bytes += len(data) if end < 0 else end + 4 - len(conn.head_tail)
            if conn.head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()
                return
            if end < 0:
                conn.head_tail = window[-3:]
            else:
                conn.head_open, conn.head_bytes, conn.head_tail = False, 0, b""
        self.inner.data_received(data)

    def _refuse_head(self) -> None:
        """431, then close: aiohttp never sees this head (no request is in flight here)."""
        conn = self.conn
        self.table.stats.closed_large_head += 1
        message = f"request head over {MAX_HEAD_BYTES} bytes"
        log.warning("bad request", extra={"status": 431, "error": message})
        body = f"{message}\n".encode()
        head = (
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        if isinstance(conn.transport, asyncio.WriteTransport):
            conn.transport.write(head.encode() + body)
        _close(conn, time.monotonic(), at_once=False)

    def eof_received(self) -> bool | None:
        self.inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.table.discard(self.conn)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _OneLineLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log (bad HTTP from clients) as one line with the error, no traceback."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        exc_info = kwargs.get("exc_info")
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        extra: dict[str, str] = {}
        if exc is not None:
            extra["error"] = f"{type(exc).__name__}: {exc}"[:500]
        text = str(msg) % args if args else str(msg)
        self.logger.log(min(level, logging.WARNING), text[:500], extra=extra)


# -- the HTTP server -------------------------------------------------------------------------------

_STARTED = web.RequestKey("ipnc.started", float)


class WebhookServer:
    def __init__(
        self,
        settings: WaiterSettings,
        namespaces: Namespaces,
        tls: TlsFiles,
        *,
        host: str = "0.0.0.0",  # a webhook is reached through its Service
        port: int = DEFAULT_PORT,
        reload_interval: float = TLS_RELOAD_INTERVAL,
        limits: Limits | None = None,
    ) -> None:
        self.settings, self.namespaces, self.tls = settings, namespaces, tls
        self.host, self.port, self.reload_interval = host, port, reload_interval
        self.limits = limits or Limits()
        self.max_connections = self.limits.max_connections
        self.ready = False
        self.connections = ConnectionTable()
        self.stats = self.connections.stats
        self.budget = ByteBudget(self.limits.buffered_bytes)
        self.lane = WorkerLane()
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._warned_at = -WARN_EVERY

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_request_bytes, middlewares=[self._guard])
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    # -- requests --

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every request: the connection's bookkeeping, and any unexpected error as one log line
        and a 500."""
        conn = self.connections.by_handler.get(request.protocol)
        now = time.monotonic()
        request[_STARTED] = now
        if conn is not None:
            request[_STARTED] = conn.reading_since if conn.reading_since is not None else now
            conn.busy += 1
            conn.reading_since = None
        try:
            return await handler(request)
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except ConnectionError as exc:  # the client went away mid-request: nobody to answer
            log.debug("client went away", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            return web.Response(status=400, text="connection lost\n")
        except Exception as exc:
            log.error(
                "request failed",
                extra={"path": request.path[:200], "error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            return web.Response(status=500, text="internal error\n")
        finally:
            if conn is not None:
                conn.busy -= 1
                self.connections.progressed(conn, time.monotonic())

    async def _mutate(self, http: web.Request) -> web.StreamResponse:
        started: float = http[_STARTED]
        try:
            async with asyncio.timeout(started + self.limits.request_timeout - time.monotonic()):
                reply = await self._review(http, started)
        except BadReview as exc:
            log.warning("bad request", extra={"status": exc.status, "error": str(exc)})
            reply = Reply(exc.status, f"{exc}\n".encode(), "text/plain")
        except TimeoutError:
            self.stats.request_timeouts += 1
            message = (
                f"no answer within {self.limits.request_timeout:g} s (--request-timeout); "
                "the failure policy decides"
            )
            log.warning("request timed out", extra={"error": message})
            reply = Reply(500, f"{message}\n".encode(), "text/plain")
        return web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)

    async def _review(self, http: web.Request, started: float) -> Reply:
        limit = self.limits.max_request_bytes
        length = http.content_length
        if length is not None and length > limit:
            raise BadReview(413, f"body is larger than {limit} bytes")
        if http.headers.get("Content-Type") is None:
            raise BadReview(415, f"Content-Type is missing (must be {JSON_TYPE})")
        if http.content_type != JSON_TYPE:
            raise BadReview(415, f"Content-Type must be {JSON_TYPE}, not {http.content_type[:80]!r}")
        small = length is not None and length <= SMALL_BODY
        async with (
            contextlib.nullcontext(0) if small else self.budget.hold(limit if length is None else length)
        ):
            try:
                async with asyncio.timeout(started + self.limits.read_timeout - time.monotonic()):
                    body = await http.read()
            except TimeoutError:
                self.stats.closed_slow += 1
                raise BadReview(408, f"body not received within {self.limits.read_timeout:g} s") from None
            except web.HTTPRequestEntityTooLarge:
                raise BadReview(413, f"body is larger than {limit} bytes") from None
            except RequestPayloadError as exc:
                raise BadReview(400, f"body is not valid HTTP: {exc}") from None
            work = functools.partial(review_reply, body, JSON_TYPE, self.settings, None, max_bytes=limit)
            first = await self.lane.run(len(body), work)
            if isinstance(first, Reply):
                return first
            namespace = await lookup_namespace(self.namespaces, first.name)
            if isinstance(namespace, Answer):
                return namespace.encoded()
            work = functools.partial(review_reply, body, JSON_TYPE, self.settings, namespace, max_bytes=limit)
            second = await self.lane.run(len(body), work)
            assert isinstance(second, Reply)
            return second

    async def _healthz(self, _: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.StreamResponse:
        if self.ready:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not ready\n")

    # -- connections --

    async def start(self) -> None:
        _small_tls_read_buffers()
        self.max_connections = connection_cap(self.limits.max_connections)
        limits = self.limits
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            logger=_OneLineLog(log, {}),
            # aiohttp's own idle close, behind ours (which the sweep applies first).
            keepalive_timeout=limits.idle_timeout + limits.read_timeout,
            max_headers=MAX_HEADERS,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            read_bufsize=HTTP_READ_BUFFER,
            lingering_time=LINGER_SECONDS,
            shutdown_timeout=limits.request_timeout,
        )
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            await self._runner.cleanup()
            raise
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self.lane.start()
        self._tasks = [
            asyncio.create_task(self._accept_forever()),
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._reload_forever()),
        ]
        self.ready = True
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if self.max_connections < self.limits.max_connections:
            log.warning(
                "the open-files limit lowers the connection cap",
                extra={"openFiles": open_files, "maxConnections": self.max_connections},
            )
        log.info(
            "webhook serving",
            extra={
                "address": f"{self.host}:{self.port}",
                "maxConnections": self.max_connections,
                "openFiles": open_files,
            },
        )

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                client, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors (the cap is above what the system gives): make room.
                    victim = self.connections.victim()
                    self._warn("out of file descriptors; closing the least recently active connection")
                    if victim is not None:
                        self.stats.evicted += 1
                        _close(victim, time.monotonic(), at_once=True)
                    await asyncio.sleep(0.05)
                continue  # other errors: that client gave up before it was accepted
            try:
                self._admit(client)
            except Exception as exc:  # never let one connection stop the accepting
                client.close()
                log.error("cannot take a connection", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})

    def _admit(self, client: socket.socket) -> None:
        now = time.monotonic()
        self.stats.accepted += 1
        if len(self.connections) >= self.max_connections:
            victim = self.connections.victim()
            if victim is None:
                self.stats.refused += 1
                self._warn("connection limit reached with a request in flight on each; refusing")
                client.close()
                return
            self.stats.evicted += 1
            self._warn("connection limit reached; closing the least recently active connection")
            self.connections.discard(victim)  # its slot is the new one's now
            _close(victim, now, at_once=True)
        conn = _Conn(client, now)
        self.connections.add(conn)
        self.stats.peak = max(self.stats.peak, len(self.connections))
        conn.opener = asyncio.create_task(self._open(conn))

    async def _open(self, conn: _Conn) -> None:
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server

        conn.opening = True

        def protocol() -> asyncio.Protocol:
            inner = server()
            conn.handler = inner
            self.connections.by_handler[inner] = conn
            return _Tracked(inner, conn, self.connections)

        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                protocol,
                conn.sock,
                ssl=self.tls.listening,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:
            self.connections.discard(conn)  # closed for another (or at stop) during its handshake
        except Exception as exc:  # a failed or timed-out handshake: asyncio closed it
            self.connections.discard(conn)
            self.stats.handshake_failed += 1
            log.debug("TLS handshake failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            conn.opener = None

    async def _sweep_forever(self) -> None:
        limits = self.limits
        interval = min(1.0, max(0.05, min(limits.read_timeout, limits.idle_timeout) / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(time.monotonic())
            except Exception as exc:  # the next sweep tries again
                log.error("connection sweep failed", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})

    def sweep(self, now: float) -> None:
        """Close connections past their read or idle timeout (and abort those whose close has not
        completed in time)."""
        limits = self.limits
        for conn in self.connections:
            if conn.handshaking or conn.busy:
                continue
            if conn.closing_since is not None:
                if now - conn.closing_since > TLS_SHUTDOWN_TIMEOUT + 1:
                    _close(conn, now, at_once=True)
            elif conn.reading_since is not None:
                if now - conn.reading_since > limits.read_timeout:
                    self.stats.closed_slow += 1
                    _close(conn, now, at_once=False)
            elif now - conn.since > limits.idle_timeout:
                self.stats.closed_idle += 1
                _close(conn, now, at_once=False)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        log.warning(message, extra={**self.connections.counts(), **vars(self.stats)})

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.tls.reload_if_changed()

    async def stop(self, *, grace: float = 0.0) -> None:
        self.ready = False
        if grace > 0:
            await asyncio.sleep(grace)  # let endpoints drop this replica before it stops answering
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        now = time.monotonic()
        for conn in self.connections:
            if conn.handshaking:
                _close(conn, now, at_once=True)
        if self._runner is not None:
            await self._runner.cleanup()  # answers requests in flight, closes the rest
            self._runner = None
        for conn in self.connections:
            _close(conn, now, at_once=True)
        await asyncio.sleep(0)
        self.lane.close()
        log.info("webhook stopped", extra=vars(self.stats))
