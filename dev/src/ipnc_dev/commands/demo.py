"""`demo`: the whole system on this machine, for a person who has no cluster (see ``demo``).

Argument parsing only; everything else is in ``ipnc_dev.demo``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from istio_pod_network_controller.cli import EXIT_INVALID, PROG
from istio_pod_network_controller.commands.common import count, positive_seconds

# The line of the product's usage, read through the entry point (see ``istio_pod_network_controller.cli``).
SUMMARY = "the whole system on this machine (root): sample app, live progress, summary"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} demo",
        description=(
            "Run the whole system on this machine (as root): a real kube-apiserver, two simulated "
            "nodes, the chart's RBAC and webhook configuration, one agent per node and the webhook; "
            "deploy a three-service sample application into a namespace that enforces the restricted "
            "Pod Security level (injected by istiod's own injector when scripts/setup has built istiod, "
            "else as Istio's saved injection output has it), show each pod being admitted, programmed "
            "and started, send requests through it, print a summary table and remove everything. "
            "Exit status 0 only when every pod ran and every request was intercepted. With --real-node "
            "the same story runs on two real nodes (kubelet, containerd, runc) with the chart installed "
            "by helm from our image, once scripts/setup has built them."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running after the summary, print the KUBECONFIG, and clean up on Ctrl-C",
    )
    p.add_argument(
        "--real-node",
        action="store_true",
        help="run on two real nodes (kubelet, containerd, runc; the chart from our image) instead of "
        "the node stand-ins: slower, needs the binaries and images scripts/setup builds",
    )
    p.add_argument(
        "--requests",
        type=count,
        default=3,
        metavar="N",
        help="requests sent frontend -> backend -> database (default 3)",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long the pods may take to start (default 60)",
    )
    p.add_argument(
        "--json-summary",
        type=Path,
        metavar="FILE",
        help="also write the summary (pods, requests, timings, what was cleaned up) as JSON to FILE",
    )
    display = p.add_mutually_exclusive_group()
    display.add_argument(
        "--live", dest="live", action="store_true", default=None, help="live table even without a terminal"
    )
    display.add_argument("--plain", dest="live", action="store_false", help="plain lines even on a terminal")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_INVALID if exc.code else 0
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a non-UTF-8 terminal gets '?' for the arrows
    from ..demo import Options, run

    return run(
        Options(keep=args.keep, requests=args.requests, timeout=args.timeout,
                json_summary=args.json_summary, live=args.live, real_node=args.real_node)
    )  # fmt: skip
