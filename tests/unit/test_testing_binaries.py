"""Where the test binaries are looked for: envtest's KUBEBUILDER_ASSETS first, then our cache, and
a missing binary names the command that builds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipnc_dev import binaries


def _exe(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_kubebuilder_assets_wins_for_the_kubernetes_binaries(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name in binaries.ALL_BINARIES:
        _exe(cache / "current", name)
    assets = tmp_path / "assets"
    for name in binaries.KUBE_BINARIES:
        _exe(assets, name)
    env = {"IPNC_TESTBIN_CACHE": str(cache), "KUBEBUILDER_ASSETS": str(assets)}
    found = binaries.find_all(env=env)
    assert {n: p.parent for n, p in found.items()} == {
        "etcd": assets,
        "kube-apiserver": assets,
        "kubectl": assets,
        "helm": (cache / "current").resolve(),
    }


def test_cache_location_follows_xdg(tmp_path: Path) -> None:
    _exe(tmp_path / "istio-pod-network-controller/testbin/current", "etcd")
    assert binaries.find("etcd", env={"XDG_CACHE_HOME": str(tmp_path)}).name == "etcd"


def test_a_missing_binary_names_scripts_setup(tmp_path: Path) -> None:
    with pytest.raises(binaries.BinaryNotFoundError, match="scripts/setup") as missing:
        binaries.find("kube-apiserver", env={"IPNC_TESTBIN_CACHE": str(tmp_path)})
    assert str(tmp_path / "current") in str(missing.value)


def test_a_non_executable_file_does_not_count(tmp_path: Path) -> None:
    (tmp_path / "current").mkdir()
    (tmp_path / "current" / "helm").write_text("not executable")
    with pytest.raises(binaries.BinaryNotFoundError):
        binaries.find("helm", env={"IPNC_TESTBIN_CACHE": str(tmp_path)})
