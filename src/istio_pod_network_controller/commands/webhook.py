"""`webhook`: the injection webhook's entry point (see ``webhook`` and ``inject``).

Every flag has an environment variable, as for ``run``, so the chart can set either. At start
the soft open-files limit is raised to the hard one (the connection cap needs the descriptors).
SIGTERM marks the server not ready, waits ``--shutdown-grace`` seconds for endpoints to drop it,
then stops and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from ..cli import EXIT_FAILURE, EXIT_OK, PROG
from .common import (
    Parser,
    count,
    excluded_namespaces,
    fail,
    parse,
    port,
    positive_seconds,
    seconds,
    stop_requested,
)

log = logging.getLogger("istio_pod_network_controller.webhook")


def _run_as(text: str) -> int | None:
    if text.strip().lower() in ("", "none"):
        return None
    if not text.isdigit() or not 0 < int(text) < 2**31:
        raise argparse.ArgumentTypeError(f"a UID above 0, or 'none': {text!r}")
    return int(text)


def _add(p: argparse.ArgumentParser, flag: str, env: str, help: str, **kwargs: Any) -> None:
    """A flag whose default comes from ``env`` (named in its help), parsed like the flag."""
    kind = kwargs.get("type")
    raw = os.environ.get(env)
    if raw is not None and kwargs.get("action") == "store_true":
        kwargs["default"] = raw.strip().lower() == "true"
    elif raw is not None:
        kwargs["default"] = kind(raw) if kind else raw
    p.add_argument(flag, help=f"{help} (env {env})", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from ..inject import DEFAULT_WAITER_UID
    from ..webhook import (
        DEFAULT_IDLE_TIMEOUT,
        DEFAULT_MAX_CONNECTIONS,
        DEFAULT_NAMESPACE_TTL,
        DEFAULT_PORT,
        DEFAULT_READ_TIMEOUT,
        DEFAULT_REQUEST_TIMEOUT,
        DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        MAX_REVIEW_BYTES,
    )

    p = Parser(
        prog=f"{PROG} webhook",
        description="Serve the mutating admission webhook that puts the waiting init container "
        "into meshed pods and replaces an injected istio-init.",
        allow_abbrev=False,
    )
    _add(
        p, "--tls-cert-file", "IPNC_TLS_CERT_FILE", "serving certificate (PEM), reloaded on change; required"
    )
    _add(p, "--tls-private-key-file", "IPNC_TLS_PRIVATE_KEY_FILE", "its private key (PEM); required")
    _add(
        p,
        "--port",
        "IPNC_WEBHOOK_PORT",
        f"HTTPS port (default {DEFAULT_PORT})",
        type=port,
        default=DEFAULT_PORT,
    )
    _add(p, "--address", "IPNC_WEBHOOK_ADDRESS", "address to listen on (default 0.0.0.0)", default="0.0.0.0")
    _add(p, "--waiter-image", "IPNC_WAITER_IMAGE", "image of the waiting init container; required")
    _add(
        p,
        "--waiter-image-pull-policy",
        "IPNC_WAITER_IMAGE_PULL_POLICY",
        "its imagePullPolicy (default: the cluster's)",
        choices=("", "Always", "IfNotPresent", "Never"),
        default="",
    )
    _add(
        p,
        "--waiter-run-as-user",
        "IPNC_WAITER_RUN_AS_USER",
        f"UID and GID of the waiter, never the proxy's (default {DEFAULT_WAITER_UID}); "
        "'none' leaves them to the platform, as OpenShift's SCCs need",
        type=_run_as,
        default=DEFAULT_WAITER_UID,
    )
    _add(
        p,
        "--waiter-timeout",
        "IPNC_WAITER_TIMEOUT",
        "the waiter's --timeout in seconds (default: the waiter's own, 300)",
        type=positive_seconds,
        default=None,
    )
    _add(
        p, "--waiter-verify", "IPNC_WAITER_VERIFY", "have the waiter prove the redirect", action="store_true"
    )
    _add(
        p,
        "--excluded-namespaces",
        "IPNC_EXCLUDED_NAMESPACES",
        "comma list of namespaces never touched besides kube-system and the controller's own "
        "(POD_NAMESPACE); give the agent the same list",
        default="",
    )
    _add(
        p,
        "--namespace-lookup",
        "IPNC_NAMESPACE_LOOKUP",
        "'api' (default): read the pod's namespace for its opt-in; 'off': only the pod's own opt-in counts",
        choices=("api", "off"),
        default="api",
    )
    _add(
        p,
        "--namespace-cache-seconds",
        "IPNC_NAMESPACE_CACHE_SECONDS",
        f"how long a namespace read is reused (default {DEFAULT_NAMESPACE_TTL:g})",
        type=seconds,
        default=DEFAULT_NAMESPACE_TTL,
    )
    _add(
        p,
        "--max-connections",
        "IPNC_WEBHOOK_MAX_CONNECTIONS",
        f"client connections at once (default {DEFAULT_MAX_CONNECTIONS}, fewer if the open-files limit "
        "is lower); at the cap the least recently active idle one is closed for the new one",
        type=count,
        default=DEFAULT_MAX_CONNECTIONS,
    )
    _add(
        p,
        "--tls-handshake-timeout",
        "IPNC_WEBHOOK_TLS_HANDSHAKE_TIMEOUT",
        f"seconds a client has to complete the TLS handshake (default {DEFAULT_TLS_HANDSHAKE_TIMEOUT:g})",
        type=positive_seconds,
        default=DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    )
    _add(
        p,
        "--read-timeout",
        "IPNC_WEBHOOK_READ_TIMEOUT",
        "seconds a request (headers and body) has to arrive, from its first byte, or from the "
        f"handshake for a connection's first request (default {DEFAULT_READ_TIMEOUT:g})",
        type=positive_seconds,
        default=DEFAULT_READ_TIMEOUT,
    )
    _add(
        p,
        "--idle-timeout",
        "IPNC_WEBHOOK_IDLE_TIMEOUT",
        f"seconds a kept-alive connection may wait for its next request (default {DEFAULT_IDLE_TIMEOUT:g})",
        type=positive_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
    )
    _add(
        p,
        "--request-timeout",
        "IPNC_WEBHOOK_REQUEST_TIMEOUT",
        "seconds from a request's first byte to its answer; past it the answer is a 500 and the "
        "failure policy decides. Keep it below the webhook configuration's timeoutSeconds "
        f"(default {DEFAULT_REQUEST_TIMEOUT:g})",
        type=positive_seconds,
        default=DEFAULT_REQUEST_TIMEOUT,
    )
    _add(
        p,
        "--max-request-bytes",
        "IPNC_WEBHOOK_MAX_REQUEST_BYTES",
        f"largest request body accepted (default {MAX_REVIEW_BYTES}, 4 MiB)",
        type=count,
        default=MAX_REVIEW_BYTES,
    )
    _add(p, "--kubeconfig", "KUBECONFIG", "kubeconfig file (default: in-cluster service account)")
    _add(
        p,
        "--shutdown-grace",
        "IPNC_SHUTDOWN_GRACE",
        "seconds between SIGTERM (not ready) and closing (default 3)",
        type=seconds,
        default=3.0,
    )
    _add(
        p,
        "--log-level",
        "IPNC_LOG_LEVEL",
        "log level (default info)",
        choices=("debug", "info", "warning", "error"),
        default="info",
    )
    return p


def main(argv: list[str]) -> int:
    try:
        parser = build_parser()  # environment defaults are parsed here
    except argparse.ArgumentTypeError as exc:
        return fail("webhook", exc)
    args = parse("webhook", parser, argv)
    if isinstance(args, int):
        return args
    for flag, value in (
        ("--tls-cert-file", args.tls_cert_file),
        ("--tls-private-key-file", args.tls_private_key_file),
        ("--waiter-image", args.waiter_image),
    ):
        if not value:
            return fail("webhook", f"{flag} is required")
    from ..observe import setup_logging

    setup_logging(args.log_level)
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from ..inject import WaiterSettings
    from ..webhook import (
        CachedNamespaces,
        Limits,
        Namespaces,
        NoNamespaces,
        TlsFiles,
        WebhookServer,
        api_namespace_fetch,
        raise_open_files_limit,
    )

    settings = WaiterSettings(
        image=args.waiter_image,
        run_as_user=args.waiter_run_as_user,
        timeout=args.waiter_timeout,
        verify=args.waiter_verify,
        image_pull_policy=args.waiter_image_pull_policy or None,
        excluded_namespaces=excluded_namespaces(args.excluded_namespaces),
    )
    api = None
    namespaces: Namespaces = NoNamespaces()
    try:
        tls = TlsFiles(args.tls_cert_file, args.tls_private_key_file)
        if args.namespace_lookup == "api":
            from ..cluster.api import Api

            api = Api.from_kubeconfig(args.kubeconfig)
            namespaces = CachedNamespaces(api_namespace_fetch(api), ttl=args.namespace_cache_seconds)
    except Exception as exc:  # any cause: reported once, here
        log.error("cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILURE
    raise_open_files_limit()
    limits = Limits(
        max_connections=args.max_connections,
        tls_handshake_timeout=args.tls_handshake_timeout,
        read_timeout=args.read_timeout,
        idle_timeout=args.idle_timeout,
        request_timeout=args.request_timeout,
        max_request_bytes=args.max_request_bytes,
    )
    server = WebhookServer(settings, namespaces, tls, host=args.address, port=args.port, limits=limits)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen", extra={"address": f"{args.address}:{args.port}", "error": str(exc)})
        if api is not None:
            await api.close()
        return EXIT_FAILURE
    await stop_requested().wait()
    log.info("stopping", extra={"graceSeconds": args.shutdown_grace})
    await server.stop(grace=args.shutdown_grace)
    if api is not None:
        await api.close()
    return EXIT_OK
