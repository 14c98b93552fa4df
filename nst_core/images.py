"""Images in and out: the `Picture` type every part of Neural Style passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .errors import ImageError


@dataclass
class Picture:
    """An image as the engine sees it.

    rgb:       float32 tensor 3×H×W, sRGB values in [0, 1].
    alpha:     None, or an int32 tensor H×W holding the original alpha values exactly
               (0…255 for 8-bit, 0…65535 for 16-bit pictures).
    bit_depth: 8 or 16, the precision of the source (and of the output where the format allows).
    source:    where it came from, for messages.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None = None
    bit_depth: int = 8
    source: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.rgb.shape[-1]

    @property
    def height(self) -> int:
        return self.rgb.shape[-2]


def load_image(path) -> Picture:
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            alpha = None
            if im.mode in ("RGBA", "LA"):
                alpha = torch.frombuffer(bytearray(im.getchannel("A").tobytes()), dtype=torch.uint8)
                alpha = alpha.view(im.height, im.width).to(torch.int32)
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except OSError as e:
        raise ImageError(path, f"cannot read image ({e})") from None
    t = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return Picture(t.permute(2, 0, 1).float() / 255.0, alpha, 8, str(path))


def save_image(picture: Picture, path, metadata: dict | None = None) -> None:
    path = Path(path)
    arr = (picture.rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    im = Image.frombytes("RGB", (picture.width, picture.height), bytes(arr.numpy().data))
    if picture.alpha is not None:
        a = Image.frombytes("L", (picture.width, picture.height), bytes(picture.alpha.to(torch.uint8).numpy().data))
        im.putalpha(a)
    im.save(path)
