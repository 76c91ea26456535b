"""The admission server: AdmissionReview v1 over TLS on ``/mutate``, plus ``/healthz``, ``/readyz``.

Why aiohttp: an admission webhook is a small HTTP server on the pod-creation path of the whole
cluster, so it must hold up against whatever reaches its port (slow clients, huge or malformed
bodies) and keep serving. aiohttp is a maintained, production HTTP server with request size limits
and keep-alive, on asyncio, which the namespace lookups need anyway; the standard library's
``http.server`` is documented as not meant for production.

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
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from .decide import decide
from .inject import Denied, Patch, Unchanged, WaiterSettings, mutate_pod
from .names import OPT_IN, OPT_IN_VALUE

log = logging.getLogger("istio_pod_network_controller.webhook")

ADMISSION_API = "admission.k8s.io/v1"
MAX_REVIEW_BYTES = 6 * 1024 * 1024  # the API server's own request limit is 3 MiB per object
DEFAULT_PORT = 9443
DEFAULT_NAMESPACE_TTL = 5.0
TLS_RELOAD_INTERVAL = 1.0
JSON_TYPE = "application/json"


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


def parse_review(body: bytes, content_type: str) -> AdmissionRequest:
    """Raw request -> AdmissionRequest; raises BadReview naming what is wrong."""
    if content_type != JSON_TYPE:
        raise BadReview(415, f"Content-Type must be {JSON_TYPE}, not {content_type[:80]!r}")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadReview(400, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadReview(400, "body is not JSON this server accepts: nested too deeply") from None
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
    """Namespaces read through ``fetch``, kept ``ttl`` seconds; one fetch per name at a time."""

    def __init__(self, fetch: Fetch, *, ttl: float = DEFAULT_NAMESPACE_TTL) -> None:
        self._fetch = fetch
        self.ttl = ttl
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
            self._cache[name] = (time.monotonic() + self.ttl, found)
            future.set_result(found)
            return found
        finally:
            del self._inflight[name]


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


def _namespace_could_opt_in(pod: Mapping[str, Any], name: str, settings: WaiterSettings) -> bool:
    """Whether the namespace's opt-in would make this pod ours (if not, no lookup is needed)."""
    opted = {"metadata": {"name": name, "annotations": {OPT_IN: OPT_IN_VALUE}}}
    return decide(pod, opted, excluded_namespaces=settings.excluded_namespaces).ours


async def admit(request: AdmissionRequest, settings: WaiterSettings, namespaces: Namespaces) -> Answer:
    if not request.is_pod_creation:
        return Answer(200, review_response(request.uid))
    if request.dry_run:
        return Answer(200, review_response(request.uid))
    pod = request.object or {}
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    ns_name = request.namespace or str(metadata.get("namespace") or "")
    namespace: Mapping[str, Any] = {"metadata": {"name": ns_name}}
    if not decide(pod, namespace, excluded_namespaces=settings.excluded_namespaces).ours and (
        _namespace_could_opt_in(pod, ns_name, settings)
    ):
        try:
            namespace = await namespaces.get(ns_name) or namespace
        except NamespaceLookupError as exc:
            log.error("namespace lookup failed", extra={"namespace": ns_name, "error": str(exc)})
            return Answer(500, f"{exc}\n")
    pod_name = str(metadata.get("name") or metadata.get("generateName") or "")
    fields = {"pod": f"{ns_name}/{pod_name}", "uid": request.uid}
    mutation = mutate_pod(pod, namespace, settings)
    if isinstance(mutation, Patch):
        log.info("pod mutated", extra={**fields, "changes": mutation.summary})
        return Answer(200, review_response(request.uid, patch=list(mutation.ops)))
    if isinstance(mutation, Denied):
        log.warning("pod denied", extra={**fields, "reason": mutation.message})
        return Answer(200, review_response(request.uid, allowed=False, message=mutation.message))
    assert isinstance(mutation, Unchanged)
    log.debug("pod left alone", extra={**fields, "reason": mutation.reason})
    return Answer(200, review_response(request.uid))


# -- TLS -------------------------------------------------------------------------------------------


class TlsFiles:
    """The serving certificate and key, reloaded when the files change (see module docstring)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._seen: tuple[bytes, bytes] | None = None
        self.current = self._load()
        self.listening = self._context()
        self.listening.sni_callback = self._choose
        self.reloads = 0

    def _read(self) -> tuple[bytes, bytes]:
        return Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes()

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def _load(self) -> ssl.SSLContext:
        seen = self._read()
        ctx = self._context()
        self._seen = seen
        return ctx

    def _choose(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        conn.context = self.current

    def reload_if_changed(self) -> bool:
        """Swap in the files' pair when it changed and loads; keep the old one otherwise."""
        try:
            seen = self._read()
        except OSError as exc:
            log.warning("cannot read the TLS files; keeping the current pair", extra={"error": str(exc)})
            return False
        if seen == self._seen:
            return False
        try:
            fresh = self._context()
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "new TLS files do not load (yet); keeping the current pair", extra={"error": str(exc)}
            )
            return False
        self.current, self._seen = fresh, seen
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert": self.cert_file})
        return True


# -- the HTTP server -------------------------------------------------------------------------------


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
    ) -> None:
        self.settings, self.namespaces, self.tls = settings, namespaces, tls
        self.host, self.port, self.reload_interval = host, port, reload_interval
        self.ready = False
        self._runner: web.AppRunner | None = None
        self._reloader: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _mutate(self, http: web.Request) -> web.StreamResponse:
        try:
            if http.content_length is not None and http.content_length > MAX_REVIEW_BYTES:
                raise BadReview(413, f"body is larger than {MAX_REVIEW_BYTES} bytes")
            try:
                body = await http.read()
            except web.HTTPRequestEntityTooLarge:
                raise BadReview(413, f"body is larger than {MAX_REVIEW_BYTES} bytes") from None
            header = http.headers.get("Content-Type")
            if header is None:
                raise BadReview(415, f"Content-Type is missing (must be {JSON_TYPE})")
            request = parse_review(body, http.content_type)
        except BadReview as exc:
            log.warning("bad request", extra={"status": exc.status, "error": str(exc)})
            return web.Response(status=exc.status, text=f"{exc}\n")
        answer = await admit(request, self.settings, self.namespaces)
        if isinstance(answer.body, str):
            return web.Response(status=answer.status, text=answer.body)
        return web.json_response(answer.body, status=answer.status)

    async def _healthz(self, _: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.StreamResponse:
        if self.ready:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not ready\n")

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            await self._runner.cleanup()
            raise
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock, ssl_context=self.tls.listening).start()
        self._reloader = asyncio.create_task(self._reload_forever())
        self.ready = True
        log.info("webhook serving", extra={"address": f"{self.host}:{self.port}"})

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.tls.reload_if_changed()

    async def stop(self, *, grace: float = 0.0) -> None:
        self.ready = False
        if grace > 0:
            await asyncio.sleep(grace)  # let endpoints drop this replica before it stops answering
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        if self._runner is not None:
            await self._runner.cleanup()
