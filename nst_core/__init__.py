"""Neural Style: artistic style transfer (Gatys, Ecker, Bethge, CVPR 2016).

`StyleParams` holds every knob; `stylize` runs one job. Heavy modules (torch) load on first use,
so that importing the package for its parameters or errors stays cheap.
"""

import os

# OpenMP threads that spin while waiting make every step several times slower whenever another
# process shares the CPU (measured: 41 s against 9.7 s for the same 20 steps on 2 busy cores).
# Set before torch loads; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import Cancelled, ImageError, NSTError, ParamError, WeightsError
from .params import StyleParams

__all__ = [
    "StyleParams", "stylize", "Session", "Result", "Progress", "Picture", "load_image", "save_image",
    "NSTError", "ParamError", "ImageError", "WeightsError", "Cancelled",
]

_LAZY = {
    "stylize": "engine", "Session": "engine", "Result": "engine", "Progress": "engine",
    "Picture": "images", "load_image": "images", "save_image": "images",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
