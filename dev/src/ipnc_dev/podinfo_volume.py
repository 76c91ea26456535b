"""A downward API volume written the way the kubelet's atomic writer writes it.

The waiter watches this directory, so the tests and the node stand-in must change it exactly as
the kubelet does, or they would test a waiter that works only on their own files: each version
lives in a timestamped ``..<time>`` folder, ``..data`` is a symlink to the current one and is
replaced by renaming a new symlink over it, and each file is a symlink through ``..data``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from istio_pod_network_controller import names
from istio_pod_network_controller.podinfo import format_annotations

DATA = "..data"
DATA_TMP = "..data_tmp"


def write_podinfo(directory: Path | str, annotations: Mapping[str, str]) -> Path:
    """Publish a new version of the ``annotations`` file in ``directory``; returns its path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    version = root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    version.mkdir()
    (version / names.PODINFO_ANNOTATIONS).write_text(format_annotations(annotations), encoding="utf-8")
    previous = os.readlink(root / DATA) if (root / DATA).is_symlink() else None
    tmp = root / DATA_TMP
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version.name)
    os.rename(tmp, root / DATA)
    link = root / names.PODINFO_ANNOTATIONS
    if not link.is_symlink():
        link.symlink_to(f"{DATA}/{names.PODINFO_ANNOTATIONS}")
    if previous is not None and previous != version.name:
        shutil.rmtree(root / previous, ignore_errors=True)
    return link
