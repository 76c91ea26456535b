"""Fixtures for the cluster tests: one real control plane (etcd + kube-apiserver) per session.

Starting the control plane takes seconds, so it is shared by the whole session; each test gets its
own namespace to keep tests independent. The time the control plane took to become ready is shown
in pytest's closing summary (issue 4 asks for it to be visible).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from ipnc_dev.controlplane import ControlPlane

_ready_lines: list[str] = []


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """The session's control plane (admin kubeconfig: ``control_plane.kubeconfig_path``)."""
    with ControlPlane.start(log=_ready_lines.append) as cp:
        yield cp


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[Client]:
    """A lightkube client authenticated as the admin (``system:masters``)."""
    with control_plane.client() as client:
        yield client


@pytest.fixture
def namespace(kube: Client) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (nothing finalizes it: no
    controller-manager runs, so its objects simply stay in etcd until the session ends)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.create(Namespace(metadata=ObjectMeta(name=name)))
    yield name
    kube.delete(Namespace, name)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The steering repo's shared fixtures (``../shared`` next to this checkout), or
    ``$IPNC_SHARED_DIR``."""
    override = os.environ.get("IPNC_SHARED_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2].parent / "shared"
    if not path.is_dir():
        pytest.fail(f"shared fixtures not found at {path} (set IPNC_SHARED_DIR)")
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _ready_lines:
        terminalreporter.write_line(line)
