"""The admission server for real: TLS on loopback with a certificate made here, AdmissionReview v1
in and out, malformed requests answered 4xx while the server keeps serving, certificates reloaded
from disk, and namespaces read only when they can change the answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from ipnc_dev.webhook_tls import ServingPair, make_serving_pair
from istio_pod_network_controller import names
from istio_pod_network_controller.inject import WaiterSettings
from istio_pod_network_controller.webhook import (
    MAX_REVIEW_BYTES,
    BadReview,
    CachedNamespaces,
    NamespaceLookupError,
    NoNamespaces,
    TlsFiles,
    WebhookServer,
    admit,
    parse_review,
)

SETTINGS = WaiterSettings(image="registry.example/ipnc:1.0")


@dataclass
class FakeNamespaces:
    """Stands in for the API (the cluster tests use the real one)."""

    objects: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    fail: bool = False
    calls: list[str] = field(default_factory=list)

    async def get(self, name: str) -> Mapping[str, Any] | None:
        self.calls.append(name)
        if self.fail:
            raise NamespaceLookupError(f"cannot read namespace {name}: HTTP 403: forbidden")
        return self.objects.get(name)


@dataclass
class Running:
    server: WebhookServer
    pair: ServingPair
    cert_file: Path
    key_file: Path
    namespaces: FakeNamespaces

    def client_context(self, ca_pem: bytes | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=(ca_pem or self.pair.ca.pem).decode())
        return ctx

    async def raw(self, data: bytes, *, ca_pem: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 exchange over a fresh TLS connection; returns status, headers, body."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.server.port, ssl=self.client_context(ca_pem), server_hostname="127.0.0.1"
        )
        try:
            writer.write(data)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {
                k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            return status, headers, body
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def post(
        self, body: bytes, *, content_type: str | None = "application/json", path: str = "/mutate"
    ) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: webhook\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        )
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        status, _, answer = await self.raw(head.encode() + b"\r\n" + body)
        return status, answer

    async def review(self, request: dict[str, Any]) -> dict[str, Any]:
        doc = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
        status, body = await self.post(json.dumps(doc).encode())
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == request["uid"]
        return answer["response"]

    async def get(self, path: str) -> tuple[int, bytes]:
        status, _, body = await self.raw(
            f"GET {path} HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n".encode()
        )
        return status, body


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    pair = make_serving_pair()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    pair.write(cert_file, key_file)
    namespaces = FakeNamespaces()
    server = WebhookServer(
        SETTINGS, namespaces, TlsFiles(str(cert_file), str(key_file)), host="127.0.0.1", port=0,
        reload_interval=0.05,
    )  # fmt: skip
    await server.start()
    try:
        yield Running(server, pair, cert_file, key_file, namespaces)
    finally:
        await server.stop()


def pod(annotations: dict[str, str] | None = None, *, istio_init: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}
    if istio_init is not None:
        spec["initContainers"] = [{"name": "istio-init", "args": istio_init}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-",
            "annotations": {names.OPT_IN: "true"} if annotations is None else annotations,
        },
        "spec": spec,
    }


def pod_request(obj: dict[str, Any] | None, **changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": "shop",
        "object": obj,
    }
    request.update(changes)
    return request


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


# -- health ------------------------------------------------------------------------------------------


async def test_health_and_readiness_are_served(running: Running) -> None:
    assert await running.get("/healthz") == (200, b"ok\n")
    assert await running.get("/readyz") == (200, b"ok\n")


async def test_readiness_drops_when_stopping(running: Running) -> None:
    running.server.ready = False
    assert (await running.get("/readyz"))[0] == 503


# -- admission -------------------------------------------------------------------------------------


async def test_an_opted_in_pod_gets_the_patch(running: Running) -> None:
    response = await running.review(pod_request(pod(istio_init=["istio-iptables", "-p", "15001"])))
    assert response["allowed"] is True
    ops = patch_of(response)
    assert [op["path"] for op in ops] == [
        "/metadata/annotations/pod-network-controller.istio.io~1iptables-args",
        "/spec/initContainers/0",
        "/spec/initContainers/0",
        "/spec/volumes",
    ]
    assert ops[1] == {"op": "remove", "path": "/spec/initContainers/0"}
    assert ops[2]["value"]["name"] == names.WAITER_CONTAINER


async def test_invalid_istio_init_args_are_denied_with_the_flag_and_value(running: Running) -> None:
    response = await running.review(pod_request(pod(istio_init=["istio-iptables", "-p", "65536"])))
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "-p" in response["status"]["message"] and "'65536'" in response["status"]["message"]


@pytest.mark.parametrize(
    "changes",
    [
        {"operation": "UPDATE", "oldObject": {}},
        {"operation": "DELETE", "object": None},
        {"kind": {"group": "", "version": "v1", "kind": "Service"}, "resource": {"resource": "services"}},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"subResource": "ephemeralcontainers"},
    ],
    ids=["update", "delete", "service", "deployment", "subresource"],
)
async def test_everything_else_is_allowed_unchanged(running: Running, changes: dict[str, Any]) -> None:
    response = await running.review(pod_request(pod(), **changes))
    assert response == {"uid": pod_request(None)["uid"], "allowed": True}


async def test_a_dry_run_gets_the_same_patch_as_the_real_request(running: Running) -> None:
    real = await running.review(pod_request(pod()))
    dry = await running.review(pod_request(pod(), dryRun=True))
    assert patch_of(real) and patch_of(dry) == patch_of(real)
    denied = await running.review(pod_request(pod(istio_init=["istio-iptables", "-p", "x"]), dryRun=True))
    assert denied["allowed"] is False


async def test_a_pod_not_opted_in_is_allowed_unchanged_after_reading_its_namespace(running: Running) -> None:
    response = await running.review(pod_request(pod(annotations={})))
    assert response == {"uid": pod_request(None)["uid"], "allowed": True}
    assert running.namespaces.calls == ["shop"]


async def test_the_namespace_opt_in_is_read_from_the_api(running: Running) -> None:
    running.namespaces.objects["shop"] = {"metadata": {"name": "shop", "annotations": {names.OPT_IN: "true"}}}
    response = await running.review(pod_request(pod(annotations={})))
    assert response["allowed"] is True and patch_of(response)


async def test_no_namespace_read_when_it_cannot_change_the_answer(running: Running) -> None:
    await running.review(pod_request(pod()))  # opted in by the pod itself
    no_sidecar = pod(annotations={})
    no_sidecar["spec"]["containers"] = [{"name": "app"}]
    await running.review(pod_request(no_sidecar))  # not meshed: no opt-in would change that
    await running.review(pod_request(pod(annotations={}), namespace="kube-system"))  # excluded
    assert running.namespaces.calls == []


async def test_a_failed_namespace_read_is_a_500_so_the_failure_policy_decides(running: Running) -> None:
    running.namespaces.fail = True
    doc = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": pod_request(pod({}))}
    status, body = await running.post(json.dumps(doc).encode())
    assert status == 500
    assert b"cannot read namespace shop" in body


# -- malformed requests: a clear 4xx, and the server keeps serving ------------------------------------

VALID = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": pod_request(pod())}


def without(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    copied = json.loads(json.dumps(doc))
    target = copied
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copied


def with_value(doc: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    copied = json.loads(json.dumps(doc))
    target = copied
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copied


J = "application/json"


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


MALFORMED = [
    ("not-json", b"{this is not json", J, 400, "not JSON"),
    ("not-utf8", b"\xff\xfe{}", J, 400, "not JSON"),
    ("empty", b"", J, 400, "not JSON"),
    ("array", b"[]", J, 400, "JSON object"),
    ("nested-bomb", b"[" * 100_000 + b"]" * 100_000, J, 400, "nested 100000 levels deep"),
    ("wrong-type", body(VALID), "text/plain", 415, "Content-Type must be application/json"),
    ("form", body(VALID), "application/x-www-form-urlencoded", 415, "Content-Type"),
    ("no-type", body(VALID), None, 415, "Content-Type is missing"),
    (
        "v1beta1",
        body(with_value(VALID, "admission.k8s.io/v1beta1", "apiVersion")),
        J,
        400,
        "expected apiVersion",
    ),
    ("no-request", body(without(VALID, "request")), J, 400, "request is missing"),
    ("no-uid", body(without(VALID, "request", "uid")), J, 400, "request.uid"),
    ("uid-number", body(with_value(VALID, 7, "request", "uid")), J, 400, "request.uid"),
    ("no-kind", body(without(VALID, "request", "kind")), J, 400, "request.kind"),
    ("no-operation", body(without(VALID, "request", "operation")), J, 400, "request.operation"),
    ("no-object", body(without(VALID, "request", "object")), J, 400, "request.object is missing"),
    ("object-string", body(with_value(VALID, "pod", "request", "object")), J, 400, "must be an object"),
    ("dryrun-string", body(with_value(VALID, "yes", "request", "dryRun")), J, 400, "dryRun"),
    ("spec-list", body(with_value(VALID, [], "request", "object", "spec")), J, 400, "spec must be an object"),
    (
        "inits-bool",
        body(with_value(VALID, True, "request", "object", "spec", "initContainers")),
        J,
        400,
        "spec.initContainers must be a list of objects",
    ),
    (
        "containers-strs",
        body(with_value(VALID, ["a"], "request", "object", "spec", "containers")),
        J,
        400,
        "spec.containers must be a list of objects",
    ),
    (
        "annotation-int",
        body(with_value(VALID, {"a": 1}, "request", "object", "metadata", "annotations")),
        J,
        400,
        "annotations must map strings to strings",
    ),
]


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
async def test_malformed_requests_get_a_clear_4xx_and_the_server_keeps_serving(
    running: Running, raw: bytes, content_type: str | None, status: int, message: str
) -> None:
    got, answer = await running.post(raw, content_type=content_type)
    assert got == status
    assert message in answer.decode()
    assert await running.get("/healthz") == (200, b"ok\n")
    assert (await running.review(pod_request(pod())))["allowed"] is True


async def test_an_oversized_body_is_refused_with_413(running: Running) -> None:
    big = b'{"pad": "' + b"x" * MAX_REVIEW_BYTES + b'"}'
    got, answer = await running.post(big)
    assert got == 413
    assert b"larger than" in answer
    assert await running.get("/healthz") == (200, b"ok\n")


async def test_an_oversized_chunked_body_is_refused_with_413(running: Running) -> None:
    chunk = b"x" * (1 << 20)
    head = b"POST /mutate HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(7)) + b"0\r\n\r\n"
    status, _, _ = await running.raw(head + chunks)
    assert status == 413
    assert await running.get("/healthz") == (200, b"ok\n")


async def test_wrong_method_and_unknown_path(running: Running) -> None:
    assert (await running.get("/mutate"))[0] == 405
    assert (await running.get("/nope"))[0] == 404


async def test_plain_http_and_garbage_on_the_tls_port_do_not_stop_the_server(running: Running) -> None:
    for junk in (b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\x00" * 64):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(junk)
        await writer.drain()
        await asyncio.wait_for(reader.read(1024), 5)
        writer.close()
    half_open = await asyncio.open_connection("127.0.0.1", running.server.port)  # never says anything
    assert await running.get("/healthz") == (200, b"ok\n")
    half_open[1].close()


# -- certificates reloaded from disk -------------------------------------------------------------------


def served_certificate(port: int, ca_pem: bytes) -> x509.Certificate:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_rotated_certificate_is_served_without_a_restart(running: Running) -> None:
    first = running.pair
    loop = asyncio.get_running_loop()
    before = await loop.run_in_executor(None, served_certificate, running.server.port, first.ca.pem)
    rotated = make_serving_pair()  # a new CA too: only the new pair can verify
    rotated.write(running.cert_file, running.key_file)
    await _until(lambda: running.server.tls.reloads == 1)
    after = await loop.run_in_executor(None, served_certificate, running.server.port, rotated.ca.pem)
    assert after.serial_number != before.serial_number
    request = b"GET /healthz HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
    assert (await running.raw(request, ca_pem=rotated.ca.pem))[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        await running.raw(request, ca_pem=first.ca.pem)  # the old certificate is no longer served


async def test_a_half_written_rotation_keeps_the_old_certificate(running: Running) -> None:
    other = make_serving_pair()
    running.cert_file.write_bytes(other.cert_pem)  # the key is still the old one: a mismatched pair
    await asyncio.sleep(0.3)
    assert running.server.tls.reloads == 0
    loop = asyncio.get_running_loop()
    served = await loop.run_in_executor(None, served_certificate, running.server.port, running.pair.ca.pem)
    assert served.public_bytes(serialization.Encoding.PEM) == running.pair.cert_pem
    running.key_file.write_bytes(other.key_pem)  # the rotation completes
    await _until(lambda: running.server.tls.reloads == 1)


# -- the namespace cache -------------------------------------------------------------------------------


async def test_concurrent_lookups_of_one_namespace_make_one_request() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def fetch(name: str) -> Mapping[str, Any] | None:
        calls.append(name)
        await release.wait()
        return {"metadata": {"name": name}}

    cache = CachedNamespaces(fetch, ttl=60)
    tasks = [asyncio.create_task(cache.get("shop")) for _ in range(20)]
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == ["shop"]
    assert all(r == {"metadata": {"name": "shop"}} for r in results)
    await cache.get("shop")
    assert calls == ["shop"]  # cached


async def test_cached_namespaces_expire_and_failures_are_not_cached() -> None:
    calls: list[str] = []
    failing = [True]

    async def fetch(name: str) -> Mapping[str, Any] | None:
        calls.append(name)
        if failing[0]:
            raise NamespaceLookupError("boom")
        return None

    cache = CachedNamespaces(fetch, ttl=0.05)
    with pytest.raises(NamespaceLookupError):
        await cache.get("shop")
    failing[0] = False
    assert await cache.get("shop") is None
    assert await cache.get("shop") is None
    await asyncio.sleep(0.06)
    assert await cache.get("shop") is None
    assert calls == ["shop", "shop", "shop"]


async def test_without_namespace_lookup_only_the_pods_opt_in_counts() -> None:
    assert await NoNamespaces().get("shop") is None


# -- hostile bodies, without a socket --------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _mutated_review(value: Any, path: list[str]) -> dict[str, Any]:
    doc = json.loads(json.dumps(VALID))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


_PATHS = [
    ["request"], ["request", "uid"], ["request", "kind"], ["request", "object"], ["request", "namespace"],
    ["request", "object", "metadata"], ["request", "object", "spec"], ["request", "dryRun"],
    ["request", "object", "spec", "initContainers"], ["request", "object", "metadata", "annotations"],
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_JSON, st.sampled_from(_PATHS))
def test_any_json_in_any_field_gets_an_answer_or_a_4xx(value: Any, path: list[str]) -> None:
    try:
        request = parse_review(json.dumps(_mutated_review(value, path)).encode(), J)
    except BadReview as exc:
        assert 400 <= exc.status < 500
        return
    answer = asyncio.run(admit(request, SETTINGS, NoNamespaces()))
    assert answer.status == 200


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_get_a_4xx_or_parse(raw: bytes) -> None:
    try:
        parse_review(raw, J)
    except BadReview as exc:
        assert 400 <= exc.status < 500
