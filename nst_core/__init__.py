"""Neural Style: artistic style transfer (Gatys, Ecker, Bethge, CVPR 2016).

`StyleParams` holds every knob; `stylize` runs one job. Heavy modules (torch) load on first use,
so that importing the package for its parameters or errors stays cheap. Importing it changes
nothing in the host process: the entry points set the process-wide policies (`runtime`).
"""

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
