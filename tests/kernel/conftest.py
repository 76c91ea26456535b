"""Kernel-test fixtures: a throwaway lab network, the backends installed here, rulesets built by
the real spec and render layers (the kernel tests pin the node side, not a copy of the rules)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from ipnc_dev.netlab import Netlab, namespaces_with_prefix
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Backend, Tools, tools
from istio_pod_network_controller.node.errors import BackendError
from istio_pod_network_controller.render import Ruleset, render
from istio_pod_network_controller.spec import parse_flags

# What istio-init gets for a default sidecar (Istio's injection template).
SIDECAR = ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*")
SIDECAR += ("-d", "15090,15021,15020", "-o", "15020")


def ruleset(*extra: str, base: tuple[str, ...] = SIDECAR) -> Ruleset:
    """The ruleset for the default sidecar flags plus ``extra`` (later flags win)."""
    return render(parse_flags([*base, *extra]))


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root")
    for binary in ("ip", "nsenter", "unshare"):
        if shutil.which(binary) is None:
            pytest.skip(f"kernel tests need {binary}")


def available_backends() -> list[Backend]:
    found = []
    for backend in Backend:
        try:
            tools(backend)
        except BackendError:
            continue
        found.append(backend)
    return found


@pytest.fixture(params=available_backends(), ids=lambda b: b.value)
def backend_tools(request: pytest.FixtureRequest) -> Tools:
    """Each installed backend in turn."""
    _needs_root()
    found: Tools = tools(request.param)
    return found


@pytest.fixture
def nft_tools() -> Tools:
    """The nf_tables backend (what current nodes use), for tests that need just one."""
    _needs_root()
    try:
        return tools(Backend.NFT)
    except BackendError:
        return tools(Backend.LEGACY)


@pytest.fixture
def lab() -> Iterator[Netlab]:
    """A fresh lab per test; checks that it left no namespace behind."""
    _needs_root()
    with Netlab() as built:
        yield built
    assert namespaces_with_prefix(built.prefix) == [], "the lab leaked namespaces"


@pytest.fixture
def applier(nft_tools: Tools) -> Applier:
    return Applier(nft_tools)
