"""Default proxy models: a small CNN for small images, ResNet-18 (CIFAR or standard stem).

A model factory is called as `factory(num_classes=..., in_channels=..., image_size=...)`, plus
`input_shape=...` when it accepts it (see `build_model`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from streamprune.errors import SettingsError
from streamprune.plugins import import_function


def small_cnn(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Two conv blocks and a linear head: fast on CPUs, enough for Fashion-MNIST-size images."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18; a CIFAR-style stem (3x3 conv, no max-pool) for images up to 32 px, the
    ImageNet stem (7x7 stride-2 conv, max-pool) above, so that 64 px inputs stay cheap."""
    if image_size <= 32:
        stem = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    else:
        stem = [
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {"small-cnn": small_cnn, "resnet18": resnet18}
# `record` on CPUs, images resized to CPU_SIZE: measured with 2 DDP workers on 2 cores at 64 px, 41-57
# samples/s a worker against ResNet-18's 10-14 (its 11M parameters are all-reduced every step)
CPU_MODEL = "small-cnn"


def resolve_model(spec: str | Callable | None, image_size: int) -> Callable[..., nn.Module]:
    """A factory from a name (`small-cnn`, `resnet18`), `package.module:factory`, a callable,
    or None (small CNN up to 32 px, ResNet-18 above)."""
    if spec is None:
        return small_cnn if image_size <= 32 else resnet18
    if callable(spec):
        return spec
    if spec in MODELS:
        return MODELS[spec]
    if ":" not in spec:
        raise SettingsError(f"model {spec!r}: expected one of {sorted(MODELS)} or 'package.module:factory'")
    return import_function(spec, "model")


def model_name(spec: str | Callable | None, image_size: int) -> str:
    """What the model `spec` for images of `image_size` is called: the default's choice by size
    (`small-cnn`, `resnet18`), a given name or `package.module:factory`."""
    if isinstance(spec, str):
        return spec
    factory = resolve_model(spec, image_size)
    return next((n for n, f in MODELS.items() if f is factory), f"{factory.__module__}:{factory.__qualname__}")


def build_model(spec: str | Callable | None, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The proxy for inputs of `input_shape` (one example, e.g. `(C, H, W)`): the factory is called with
    `num_classes`, `in_channels` (the first dimension), `image_size` (the largest other one), and
    `input_shape` too when it takes that argument (models for data that is not an image)."""
    import inspect

    shape = tuple(int(d) for d in input_shape)
    image_size = max(shape[1:], default=1)
    if spec is None and len(shape) != 3:
        raise SettingsError(f"inputs of shape {shape} are not images: name a model factory for them")
    factory = resolve_model(spec, image_size)
    kwargs: dict[str, int | tuple[int, ...]] = {
        "num_classes": num_classes,
        "in_channels": shape[0] if shape else 1,
        "image_size": image_size,
    }
    try:
        params: Mapping[str, inspect.Parameter] = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "input_shape" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["input_shape"] = shape
    return factory(**kwargs)
