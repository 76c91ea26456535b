"""The waiter in a real pod namespace, as an unprivileged UID: it passes on the mark for its own
namespace only, and `--verify` proves the redirect the node side applied (and fails without it)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_pod_network_controller import names
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.testing import as_pod
from istio_pod_network_controller.testing.netlab import Netlab, Pod
from istio_pod_network_controller.testing.podinfo_volume import write_podinfo

from .conftest import SIDECAR, ruleset

pytestmark = pytest.mark.kernel

WAITER_UID = 65532


def run_waiter(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = as_pod.command(netns, WAITER_UID, "init", *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603


@pytest.fixture
def volume() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ipnc-podinfo-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


@pytest.fixture
def pod(lab: Netlab) -> Pod:
    return lab.add_pod("pod", ipv6=False)


def mark(volume: Path, inode: int, **extra: str) -> Path:
    detail = {"netnsInode": inode, "rulesetSha256": "f" * 64, "appliedAt": "2026-01-01T00:00:00Z"}
    return write_podinfo(
        volume,
        {
            names.STATUS: names.STATUS_INITIALIZED,
            names.DETAIL: json.dumps(detail),
            names.IPTABLES_ARGS: json.dumps(["istio-iptables", *SIDECAR]),
            **extra,
        },
    )


def test_verify_proves_the_redirect_the_node_side_applied(pod: Pod, applier: Applier, volume: Path) -> None:
    with Netns(pod.path) as ns:
        applier.apply(ns, ruleset())
        path = mark(volume, ns.inode)
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(
        "outbound redirect proven: 192.0.2.1:80 reached the proxy port 15001"
    ), done.stdout


def test_verify_fails_when_the_rules_are_missing(pod: Pod, volume: Path) -> None:
    with Netns(pod.path) as ns:
        path = mark(volume, ns.inode)  # a mark that lies: no rules in the namespace
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify", "--verify-timeout", "1")
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        "istio-pod-network-controller init: redirect check failed: connecting to 192.0.2.1:80"
    )


def test_the_mark_of_another_namespace_does_not_pass(lab: Netlab, pod: Pod, volume: Path) -> None:
    other = lab.add_pod("old-sandbox", ipv6=False)
    with Netns(other.path) as ns:
        path = mark(volume, ns.inode)
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "0.5")
    assert done.returncode == 1
    assert "an earlier sandbox" in done.stderr.splitlines()[-1]
