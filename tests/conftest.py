"""Shared fixtures. Append yours; keep each one opt-in (no autouse here)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
