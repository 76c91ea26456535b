"""Where a real node's binaries and images are: the caches ``scripts/build-realnode`` and
``scripts/build-images`` fill.

Both scripts build into a per-user cache with a ``current`` symlink to the last build; this module
is the one place of the harness that knows those folders (as ``ipnc_dev.binaries`` is for etcd,
kube-apiserver, kubectl and helm), and says which script to run when something is missing.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_BINARIES = (
    "kubelet",
    "kube-proxy",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "runc",
    "crictl",
)
# The archives scripts/build-images lists in IMAGES, by role.
PAUSE_ARCHIVE = "pause.tar"
BUSYBOX_ARCHIVE = "busybox.tar"
PYTHON_ARCHIVE = "python.tar"
PRODUCT_ARCHIVE = "istio-pod-network-controller.tar"
STUB_ARCHIVE = "stub-sidecar.tar"
IMAGE_ARCHIVES = (PAUSE_ARCHIVE, BUSYBOX_ARCHIVE, PYTHON_ARCHIVE, PRODUCT_ARCHIVE, STUB_ARCHIVE)
# Istio's istio-init (its real istio-iptables): only the benchmark's comparison runs it, so it is
# imported only when a caller names it (importing 108 MiB costs every other cluster seconds).
ISTIO_INIT_ARCHIVE = "istio-init.tar"
CNI_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
# An image reference as buildah names them: repository[:tag], no digest.
_IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_.-]+)?$")


class ArtifactError(FileNotFoundError):
    """A binary or an image is missing; the message names the script that builds it."""


def _cache_base(env: Mapping[str, str]) -> Path:
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "istio-pod-network-controller"


def binaries_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$IPNC_REALNODE_CACHE/current``, default ``<cache>/realnode/current``."""
    env = os.environ if env is None else env
    cache = (
        Path(env["IPNC_REALNODE_CACHE"]) if env.get("IPNC_REALNODE_CACHE") else _cache_base(env) / "realnode"
    )
    return cache / "current"


def images_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$IPNC_IMAGES_CACHE/current``, default ``<cache>/images/current``."""
    env = os.environ if env is None else env
    cache = Path(env["IPNC_IMAGES_CACHE"]) if env.get("IPNC_IMAGES_CACHE") else _cache_base(env) / "images"
    return cache / "current"


def node_binaries(env: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Path of each node binary; raises ``ArtifactError`` naming ``scripts/build-realnode``."""
    folder = binaries_dir(env)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in NODE_BINARIES:
        path = folder / name
        if path.is_file() and os.access(path, os.X_OK):
            found[name] = path.resolve()
        else:
            missing.append(name)
    if missing:
        raise ArtifactError(
            f"real-node binaries missing in {folder}: {', '.join(missing)}; run scripts/build-realnode "
            "(scripts/setup runs it) or set IPNC_REALNODE_CACHE"
        )
    return found


def cni_plugins() -> Path:
    """The CNI plugin folder (Debian's containernetworking-plugins)."""
    missing = [p for p in CNI_PLUGINS if not (CNI_DIR / p).is_file()]
    if missing:
        raise ArtifactError(
            f"CNI plugins missing in {CNI_DIR}: {', '.join(missing)}; run scripts/build-realnode "
            "(it installs Debian's containernetworking-plugins)"
        )
    return CNI_DIR


@dataclass(frozen=True)
class Images:
    """The image archives of ``scripts/build-images`` and the names pods must use for them."""

    folder: Path
    names: Mapping[str, str]  # archive file name -> image name

    @property
    def pause(self) -> str:
        return self.names[PAUSE_ARCHIVE]

    @property
    def busybox(self) -> str:
        return self.names[BUSYBOX_ARCHIVE]

    @property
    def python(self) -> str:
        return self.names[PYTHON_ARCHIVE]

    @property
    def product(self) -> str:
        return self.names[PRODUCT_ARCHIVE]

    @property
    def stub(self) -> str:
        return self.names[STUB_ARCHIVE]

    @property
    def istio_init(self) -> str:
        return self.names[ISTIO_INIT_ARCHIVE]

    def archives(self, only: Sequence[str] | None = None) -> list[Path]:
        """The archives to import: ``only`` those (the pause image always), else every one of
        ``IMAGE_ARCHIVES`` the folder has (the extras, such as istio-init, only when named)."""
        wanted = set(only) | {PAUSE_ARCHIVE} if only is not None else set(IMAGE_ARCHIVES)
        return [self.folder / archive for archive in self.names if archive in wanted]


def parse_images_list(text: str) -> dict[str, str]:
    """``IMAGES``: one ``<archive> <image name>`` per line."""
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or "/" in parts[0] or not parts[0].endswith(".tar"):
            raise ValueError(f"IMAGES line {number}: expected '<archive>.tar <image name>', got {line!r}")
        if not _IMAGE_NAME.match(parts[1]):
            raise ValueError(f"IMAGES line {number}: not an image name: {parts[1]!r}")
        names[parts[0]] = parts[1]
    return names


def images(env: Mapping[str, str] | None = None, *, required: tuple[str, ...] = IMAGE_ARCHIVES) -> Images:
    """The images of the last ``scripts/build-images`` run; raises ``ArtifactError`` when one of
    ``required`` is not there."""
    folder = images_dir(env)
    listing = folder / "IMAGES"
    try:
        names = parse_images_list(listing.read_text())
    except OSError:
        names = {}
    except ValueError as e:
        raise ArtifactError(f"{listing}: {e}; run scripts/build-images again") from None
    missing = [a for a in required if a not in names or not (folder / a).is_file()]
    if missing:
        raise ArtifactError(
            f"images missing in {folder}: {', '.join(missing)}; run scripts/build-images "
            "(scripts/setup runs it) or set IPNC_IMAGES_CACHE"
        )
    return Images(folder, names)


def config_digest(archive: Path) -> str:
    """``sha256:...`` of the image configuration in an OCI archive (of its only manifest): what
    the container runtime reports as the image ID of containers run from it."""
    with tarfile.open(archive) as tar:
        index = _json_member(tar, "index.json")
        manifests = index.get("manifests") or []
        if len(manifests) != 1:
            raise ValueError(f"{archive}: expected one manifest, found {len(manifests)}")
        manifest = _json_member(tar, "blobs/" + str(manifests[0]["digest"]).replace(":", "/"))
    return str(manifest["config"]["digest"])


def _json_member(tar: tarfile.TarFile, name: str) -> dict[str, Any]:
    member = tar.extractfile(name)
    if member is None:
        raise ValueError(f"{name} is not a file in the archive")
    data = json.loads(member.read())
    if not isinstance(data, dict):
        raise ValueError(f"{name} is not a JSON object")
    return data
