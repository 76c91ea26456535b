"""Where the test-only binaries (etcd, kube-apiserver, kubectl, helm) are.

The cluster tests and ``dev cluster`` run these programs for real, and they are not installed
system-wide: ``scripts/build-testbin`` (run by ``scripts/setup``) builds them from the Go module
proxy into a per-user cache. This module is the one place that knows where that cache is, and it
honours envtest's ``KUBEBUILDER_ASSETS`` so that someone who already has binaries can use theirs.

Lookup order for each binary:
1. ``KUBEBUILDER_ASSETS`` (a folder holding etcd, kube-apiserver and kubectl), when set;
2. ``IPNC_TESTBIN_DIR`` (a folder such as the one the build script prints), when set;
3. ``<cache>/current`` -- the last build of ``scripts/build-testbin``, where ``<cache>`` is
   ``$IPNC_TESTBIN_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/istio-pod-network-controller/testbin``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

KUBE_BINARIES = ("etcd", "kube-apiserver", "kubectl")
ALL_BINARIES = (*KUBE_BINARIES, "helm")


class BinaryNotFoundError(FileNotFoundError):
    """A test binary is missing; the message says how to get it."""


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The folder ``scripts/build-testbin`` builds into (one subfolder per set of versions)."""
    env = os.environ if env is None else env
    if env.get("IPNC_TESTBIN_CACHE"):
        return Path(env["IPNC_TESTBIN_CACHE"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "istio-pod-network-controller" / "testbin"


def search_path(name: str, env: Mapping[str, str] | None = None) -> list[Path]:
    """The folders searched for ``name``, in order."""
    env = os.environ if env is None else env
    dirs: list[Path] = []
    if name in KUBE_BINARIES and env.get("KUBEBUILDER_ASSETS"):
        dirs.append(Path(env["KUBEBUILDER_ASSETS"]))
    if env.get("IPNC_TESTBIN_DIR"):
        dirs.append(Path(env["IPNC_TESTBIN_DIR"]))
    dirs.append(cache_dir(env) / "current")
    return dirs


def find(name: str, env: Mapping[str, str] | None = None) -> Path:
    """The path of the test binary ``name``; raises ``BinaryNotFoundError`` naming the fix."""
    if name not in ALL_BINARIES:
        raise ValueError(f"unknown test binary {name!r} (known: {', '.join(ALL_BINARIES)})")
    dirs = search_path(name, env)
    for d in dirs:
        candidate = d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    looked = ", ".join(str(d) for d in dirs)
    raise BinaryNotFoundError(
        f"test binary {name!r} not found (looked in: {looked}). "
        "Run scripts/setup (or scripts/build-testbin) to build etcd, kube-apiserver, kubectl and helm "
        "from the Go module proxy, or set KUBEBUILDER_ASSETS to a folder holding etcd, "
        "kube-apiserver and kubectl."
    )


def find_all(names: tuple[str, ...] = ALL_BINARIES, env: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Paths of several test binaries at once (the first missing one raises)."""
    return {name: find(name, env) for name in names}
