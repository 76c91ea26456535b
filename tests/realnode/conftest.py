"""The real-node tier: real kubelets, containerd and runc in namespaces of their own, our image
from the Dockerfile, our chart through helm (see docs/real-node.md).

Every test module here marks its tests ``realnode`` (deselect with ``-m "not realnode"``). They need root, the
binaries of scripts/build-realnode and scripts/build-testbin and the images of
scripts/build-images: without root they are skipped, as the kernel tier is; a missing binary or
image fails them, naming the script. How long each cluster took is shown in pytest's closing
summary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
timings: list[str] = []


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("real nodes need root (namespaces, mounts, cgroups, iptables)")


def shared_injected() -> Path:
    """Istio's injected manifests (``../shared/istio/injected``, or under ``$IPNC_SHARED_DIR``)."""
    override = os.environ.get("IPNC_SHARED_DIR")
    shared = Path(override) if override else HERE.parents[2] / "shared"
    path = shared / "istio" / "injected"
    if not path.is_dir():
        pytest.fail(f"shared fixtures not found at {path} (set IPNC_SHARED_DIR)")
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in timings:
        terminalreporter.write_line(line)
