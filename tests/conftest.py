"""Shared fixtures. Append yours; keep each one opt-in (no autouse here)."""

from __future__ import annotations

from pathlib import Path

import os

import pytest

# Several test runs share two cores here. OpenMP's default (spinning) wait makes torch's small
# operations up to ten times slower when its threads compete with other processes for the cores;
# sleeping threads keep the test run's wall time near its CPU time. Set before torch is imported,
# and inherited by the `nst` subprocesses the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Real images (public-domain paintings and a CC BY photograph) live beside the project, never in it.
SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"


@pytest.fixture(scope="session")
def shared_image():
    """shared_image("tubingen.jpg") → its path; skips the test where ../shared/images lacks it."""
    def get(name: str) -> Path:
        path = SHARED_IMAGES / name
        if not path.is_file():
            pytest.skip(f"{path} is not available")
        return path
    return get


@pytest.fixture(scope="session")
def nst_cache_dir(tmp_path_factory) -> Path:
    """One NST cache (normalisation scales of the random network) for the whole run, so that the
    calibration of the random weights is computed once, both in-process and in `nst` subprocesses."""
    return tmp_path_factory.mktemp("nst-cache")
