"""VGG-19's convolutional part as a feature extractor addressed by layer name.

The module keeps torchvision's layout (``features.0`` … ``features.34``), so torchvision's state
dict loads into it as it is once the classifier is dropped, and it is built only up to the last
layer in use. Inputs are RGB in [0, 1]; the ImageNet normalisation happens inside.
"""

from __future__ import annotations

import torch
from torch import nn

from .params import VGG19_LAYERS, StyleParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


def conv_names(last: str = "relu5_4") -> list[str]:
    """The convolution layers up to and including `last`, in order."""
    upto = VGG19_LAYERS[: VGG19_LAYERS.index(last) + 1]
    return [n for n in upto if n.startswith("conv")]


def state_dict_key(conv: str) -> str:
    """torchvision's key prefix for a convolution layer, e.g. conv1_1 → features.0."""
    return f"features.{VGG19_LAYERS.index(conv)}"


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The weight and bias shapes of all 16 convolutions, by state dict key."""
    shapes, cin = {}, 3
    for name in conv_names("relu5_4"):
        cout = _CHANNELS[int(name[4])]
        shapes[f"{state_dict_key(name)}.weight"] = (cout, cin, 3, 3)
        shapes[f"{state_dict_key(name)}.bias"] = (cout,)
        cin = cout
    return shapes


class VGGFeatures(nn.Module):
    """VGG-19 up to `last`, returning the outputs of the layers asked for by name."""

    def __init__(self, pooling: str = StyleParams.default("pooling"), last: str = "relu5_4"):
        super().__init__()
        if last not in VGG19_LAYERS:
            raise ValueError(f"unknown VGG-19 layer {last!r}")
        self.pooling = pooling
        self.last = last
        layers: list[nn.Module] = []
        cin = 3
        for name in VGG19_LAYERS[: VGG19_LAYERS.index(last) + 1]:
            if name.startswith("conv"):
                cout = _CHANNELS[int(name[4])]
                layers.append(nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
            elif name.startswith("relu"):
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.names = VGG19_LAYERS[: len(layers)]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: torch.Tensor, layers) -> dict[str, torch.Tensor]:
        """Run `image` (N×3×H×W, RGB in [0, 1]) and return {layer name: output} for `layers`."""
        wanted = set(layers)
        unknown = wanted - set(self.names)
        if unknown:
            raise ValueError(f"layers beyond {self.last} or unknown: {sorted(unknown)}")
        out: dict[str, torch.Tensor] = {}
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        for name, layer in zip(self.names, self.features):
            x = layer(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def convs(self) -> dict[str, nn.Conv2d]:
        """The convolution modules by layer name."""
        return {n: m for n, m in zip(self.names, self.features) if isinstance(m, nn.Conv2d)}
