"""`run`: the node agent (DaemonSet). Flags, each with an environment variable for the chart."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from ..cli import EXIT_FAILURE, EXIT_OK, PROG
from .common import Parser, count, excluded_namespaces, fail, parse, port, positive_seconds, stop_requested

if TYPE_CHECKING:
    from ..node.netns import Netns
    from ..node.programmer import NodeApplier

log = logging.getLogger("istio_pod_network_controller.run")

DEFAULT_LISTEN = "[::]:15300"  # every address, IPv6 and IPv4 (IPv4 only where IPv6 is off)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


NATIVE_NFTABLES_ENV = "IPNC_NATIVE_NFTABLES"
MARK_HANDOFF_ENV = "IPNC_MARK_HANDOFF"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment variable (unset or empty: ``default``); a value that is neither true
    nor false is refused when the command line is read (see ``check_env``)."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value in _TRUE


def check_env() -> str | None:
    """What is wrong with the boolean environment variables, or None."""
    for name in (NATIVE_NFTABLES_ENV, MARK_HANDOFF_ENV):
        value = os.environ.get(name, "")
        if value.strip().lower() not in (*_TRUE, *_FALSE):
            return f"{name}: not true or false: {value[:40]!r}"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=f"{PROG} run",
        description="Run the node agent: program the network namespaces of this node's meshed pods.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (env KUBECONFIG; default: in-cluster service account)",
    )
    p.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        help="this node's name (env NODE_NAME, from the downward API); required",
    )
    p.add_argument(
        "--proc-root",
        default=_env("IPNC_PROC_ROOT", "/proc"),
        help="the host's /proc as mounted in the agent (env IPNC_PROC_ROOT; default /proc)",
    )
    p.add_argument(
        "--iptables-backend",
        choices=("auto", "nft", "legacy"),
        default=_env("IPNC_IPTABLES_BACKEND", "auto"),
        help="iptables backend inside pods (env IPNC_IPTABLES_BACKEND; default auto: the node's)",
    )
    p.add_argument(
        "--native-nftables",
        action="store_true",
        default=env_flag(NATIVE_NFTABLES_ENV),
        help="Istio's native nftables mode: tables inet istio-proxy-* written with nft, instead of "
        f"iptables (env {NATIVE_NFTABLES_ENV}=true; default off, as Istio's values.global.nativeNftables)",
    )
    p.add_argument(
        "--mark-handoff",
        action=argparse.BooleanOptionalAction,
        default=env_flag(MARK_HANDOFF_ENV, default=True),
        help="also hand each waiter its mark inside its pod's network namespace, an abstract unix "
        f"socket (env {MARK_HANDOFF_ENV}; default on; off: the waiter reads the kubelet's "
        "downward-API file only)",
    )
    p.add_argument(
        "--workers",
        type=count,
        default=_env("IPNC_WORKERS", "4"),  # a string default goes through `type` too
        help="pods programmed at once (env IPNC_WORKERS; default 4)",
    )
    p.add_argument(
        "--excluded-namespaces",
        default=_env("IPNC_EXCLUDED_NAMESPACES", ""),
        help="comma list of namespaces never touched, besides kube-system and the agent's own "
        "(env IPNC_EXCLUDED_NAMESPACES)",
    )
    p.add_argument(
        "--listen-address",
        type=listen_address,
        default=_env("IPNC_LISTEN_ADDRESS", DEFAULT_LISTEN),
        help=f"HOST:PORT for /metrics, /healthz, /readyz (env IPNC_LISTEN_ADDRESS; default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=_env("IPNC_LOG_LEVEL", "info"),
        help="log level (env IPNC_LOG_LEVEL; default info)",
    )
    p.add_argument(
        "--resync-seconds",
        type=positive_seconds,
        default=_env("IPNC_RESYNC_SECONDS", "300"),
        help="re-check every pod this often (env IPNC_RESYNC_SECONDS; default 300)",
    )
    return p


def _host_netns(proc_root: str) -> Netns | None:
    """The host's network namespace (PID 1's, seen through the host's /proc), where the node's
    own rules tell which iptables backend it uses. None when it cannot be opened: the agent's
    own namespace is asked instead (the host's, when the agent runs with hostNetwork)."""
    from ..node.errors import NodeError
    from ..node.netns import Netns

    try:
        return Netns(f"{proc_root}/1/ns/net")
    except (NodeError, OSError) as exc:
        log.warning("cannot open the host's network namespace; detecting the backend in our own",
                    extra={"error": str(exc)})  # fmt: skip
        return None


def _applier(args: argparse.Namespace) -> NodeApplier[Any]:
    """The mode the flags name. Not chosen from what the node runs: Istio's mode is one setting
    for the whole mesh (values.global.nativeNftables), see docs/node-side.md."""
    from ..node.apply import Applier
    from ..node.backend import Backend, detect

    if args.native_nftables:
        from ..node.nft import NftApplier

        return NftApplier()
    forced = None if args.iptables_backend == "auto" else Backend(args.iptables_backend)
    host = _host_netns(args.proc_root)
    try:
        tools = detect(forced=forced, host=host)
    finally:
        if host is not None:
            host.close()
    return Applier(tools)


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPV6]:PORT``; an empty host is every IPv4 address)."""
    host, sep, number = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", port(number)


def main(argv: list[str]) -> int:
    problem = check_env()
    if problem is not None:
        return fail("run", problem)
    args = parse("run", build_parser(), argv)
    if isinstance(args, int):
        return args
    from ..observe import setup_logging

    setup_logging(args.log_level)
    if not args.node_name:
        return fail("run", "the node name is required (--node-name or env NODE_NAME)")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_OK


async def _run(args: argparse.Namespace) -> int:
    from ..agent import Agent, AgentConfig
    from ..cluster.api import Api, ApiError
    from ..node.errors import NodeError
    from ..observe import HealthServer, Metrics

    try:
        applier = _applier(args)
        api = Api.from_kubeconfig(args.kubeconfig)
    except (NodeError, ApiError, OSError, ValueError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return EXIT_FAILURE
    config = AgentConfig(
        node_name=args.node_name,
        proc_root=args.proc_root,
        workers=args.workers,
        excluded_namespaces=excluded_namespaces(args.excluded_namespaces),
        resync_seconds=args.resync_seconds,
        handoff=args.mark_handoff,
    )
    metrics = Metrics()
    agent = Agent(config, api, applier, metrics)
    health = HealthServer(args.listen_address, metrics, healthy=agent.healthy, ready=agent.ready.is_set)
    health.start()
    stop = stop_requested()
    host = args.listen_address[0]
    where = {"node": config.node_name, "listen": f"{host}:{health.port}"}
    log.info("starting", extra={**where, "mode": applier.mode, "backend": applier.backend})
    starting = agent.launch()
    await stop.wait()
    log.info("signal received: draining")
    starting.cancel()
    await agent.stop()
    health.stop()
    await api.close()
    return EXIT_OK
