"""Shared test helpers: where the shared fixtures live, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IPNC_SHARED_DIR", REPO.parent / "shared"))
INJECTED = SHARED / "istio" / "injected"


@pytest.fixture
def injected_dir() -> Path:
    if not INJECTED.is_dir():
        pytest.fail(f"shared fixtures not found at {INJECTED} (set IPNC_SHARED_DIR)")
    return INJECTED
