"""Sample images shipped with Neural Style (public domain / CC0; see ATTRIBUTION.md here)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError

SAMPLES_DIR = Path(__file__).resolve().parent

# Roles the demo asks for, and the files that play them.
SAMPLES = {"content": "chelsea.png", "style": "gravel.png"}

# The natural colour photographs that calibrate the normalised network (`nst_core.weights`).
# coffee.png is held out on purpose: tests and benchmarks measure the calibration on it.
CALIBRATION = ("astronaut.png", "chelsea.png", "hubble_deep_field.png", "retina.png", "rocket.png")
HELD_OUT = ("coffee.png",)


def sample_path(name: str) -> Path:
    """The path of a sample: a role ("content", "style"), a file name, or a file name's stem."""
    file = SAMPLES.get(name, name)
    candidates = [SAMPLES_DIR / file] + ([] if Path(file).suffix else [SAMPLES_DIR / f"{file}.png"])
    for p in candidates:
        if Path(file).name == file and p.is_file() and p.suffix == ".png":
            return p
    known = sorted(set(SAMPLES) | {p.name for p in SAMPLES_DIR.glob("*.png")})
    raise ImageError(SAMPLES_DIR / file, f"no such sample (there are: {', '.join(known)})")
