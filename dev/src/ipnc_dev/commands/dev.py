"""``dev``: tools for a developer at a terminal, not for a cluster.

``dev cluster`` starts the same real control plane the cluster tests use (etcd and kube-apiserver
on loopback, see ``ipnc_dev/controlplane.py``), prints its kubeconfig and waits until Ctrl-C, so a
person can point kubectl, helm or the agent at a real API server without a kubelet or a VM.

``dev cluster --real-node [--nodes 2]`` starts the real-node tier's cluster instead
(``ipnc_dev/realnode``: real kubelets, containerd and runc, each node in namespaces of its own,
plus the controller-manager and the scheduler), installs the chart from this checkout with the
image ``scripts/build-images`` built from the Dockerfile, and on Ctrl-C or SIGTERM tears it all
down and checks that the host is as it was.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from ..binaries import BinaryNotFoundError
from ..controlplane import ControlPlane, ControlPlaneError

SUMMARY = "developer tools: 'dev cluster' runs a local etcd + kube-apiserver (or real nodes) until Ctrl-C"

EXIT_OK = 0
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="istio-pod-network-controller dev",
        description="Developer tools.",
    )
    sub = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    cluster = sub.add_parser(
        "cluster",
        help="run a local etcd + kube-apiserver until Ctrl-C and print its kubeconfig",
        description=(
            "Start a real etcd and kube-apiserver on loopback (no kubelet, scheduler or "
            "controller-manager), print the admin kubeconfig path and wait until Ctrl-C or SIGTERM; "
            "then stop both and remove their temporary folder."
        ),
    )
    cluster.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="PATH",
        help="also copy the admin kubeconfig to PATH (valid while the cluster runs)",
    )
    cluster.add_argument(
        "--ready-timeout", type=float, default=90.0, metavar="SECONDS", help="how long to wait for /readyz"
    )
    cluster.add_argument(
        "--real-node",
        action="store_true",
        help="real nodes (kubelet, containerd, runc; as root) with the chart installed from our image",
    )
    cluster.add_argument(
        "--nodes",
        type=int,
        choices=(1, 2),
        default=None,
        help="how many real nodes (with --real-node; default 1)",
    )
    return parser


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _cluster(kubeconfig_copy: Path | None, ready_timeout: float) -> int:
    # Both signals explicitly: a shell starts background jobs with SIGINT ignored, and Python then
    # would not turn Ctrl-C (or `kill -INT`) into KeyboardInterrupt.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ControlPlane.start(ready_timeout=ready_timeout) as cp:
            kubeconfig = cp.kubeconfig_path
            if kubeconfig_copy is not None:
                kubeconfig_copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cp.kubeconfig_path, kubeconfig_copy)
                kubeconfig = kubeconfig_copy
            print(f"API server: {cp.server}")
            print(f"kubeconfig: {kubeconfig}")
            print(f"  export KUBECONFIG={kubeconfig}")
            print("Ctrl-C stops it.", flush=True)
            while True:
                for name, code in cp.exit_codes().items():
                    if code is not None:
                        logs = "\n".join(f"--- {n} ---\n{t}" for n, t in cp.logs().items())
                        print(f"dev cluster: {name} exited with status {code}\n{logs}", file=sys.stderr)
                        return EXIT_FAILURE
                time.sleep(1)
    except (KeyboardInterrupt, _Stop):
        print("\nstopped", file=sys.stderr)
        return EXIT_OK
    except (ControlPlaneError, BinaryNotFoundError) as e:
        print(f"dev cluster: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if kubeconfig_copy is not None:
            kubeconfig_copy.unlink(missing_ok=True)


def _real_cluster(kubeconfig_copy: Path | None, nodes: int, ready_timeout: float) -> int:
    # Imported here: `dev cluster` without --real-node needs none of it.
    from ..chart import ChartError
    from ..realnode import RealCluster, RealClusterError, Terminated, install

    try:
        # RealCluster turns SIGTERM (and SIGINT, even when a shell started us with it ignored)
        # into an exception while it runs, and tears down whatever happens.
        with RealCluster(nodes=nodes, ready_timeout=max(ready_timeout, 60.0)) as cluster:
            release = install.install(cluster)
            kubeconfig = cluster.kubeconfig_path
            if kubeconfig_copy is not None:
                kubeconfig_copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(kubeconfig, kubeconfig_copy)
                kubeconfig = kubeconfig_copy
            print(f"API server: {cluster.server}")
            print(f"nodes: {', '.join(n.name for n in cluster.nodes)} (state {cluster.state})")
            print(f"chart: release {install.RELEASE} in namespace {release.namespace}, image {release.image}")
            print(f"kubeconfig: {kubeconfig}")
            print(f"  export KUBECONFIG={kubeconfig}")
            print("Ctrl-C stops it.", flush=True)
            while True:
                cluster.check_alive()
                time.sleep(1)
    except (KeyboardInterrupt, Terminated):
        print("\nstopped; the host is as it was", file=sys.stderr)
        return EXIT_OK
    except (RealClusterError, install.InstallError, ChartError, BinaryNotFoundError) as e:
        print(f"dev cluster: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if kubeconfig_copy is not None:
            kubeconfig_copy.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tool == "cluster":
        if args.nodes is not None and not args.real_node:
            parser.error("--nodes needs --real-node")
        if args.real_node:
            return _real_cluster(args.kubeconfig, args.nodes or 1, args.ready_timeout)
        return _cluster(args.kubeconfig, args.ready_timeout)
    raise AssertionError(f"unhandled tool {args.tool!r}")  # argparse rejects unknown ones
