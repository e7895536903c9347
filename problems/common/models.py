"""Small classifiers on (N, C, H, W) images, built fresh from a random initialization: the
models that evaluate a synthetic or poisoned training set, and the students / victims of the
bilevel problems."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["convnet", "linear", "make_model", "mlp", "seeded"]

Built = TypeVar("Built")


def linear(in_shape: Sequence[int] = (1, 8, 8), classes: int = 10) -> nn.Module:
    """Softmax regression on the flattened image."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), classes))


def mlp(in_shape: Sequence[int] = (1, 8, 8), classes: int = 10, hidden: int = 128, depth: int = 1,
        activation: str = "relu") -> nn.Module:
    """``depth`` hidden layers of width ``hidden`` (ReLU, or tanh: smooth, for derivative checks)
    on the flattened image."""
    if activation not in ("relu", "tanh"):
        raise ValueError(f"unknown activation {activation!r}; expected 'relu' or 'tanh'")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU() if activation == "relu" else nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def convnet(in_shape: Sequence[int] = (1, 8, 8), classes: int = 10, width: int = 32, depth: int = 2) -> nn.Module:
    """The ConvNet of the distillation literature, scaled down: ``depth`` blocks of 3x3 conv,
    ReLU and 2x2 average pooling (while the image is at least 2 pixels wide), then a linear layer."""
    channels, height, wide = in_shape
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        channels = width
        if min(height, wide) >= 2:
            layers.append(nn.AvgPool2d(2))
            height, wide = height // 2, wide // 2
    layers += [nn.Flatten(), nn.Linear(channels * height * wide, classes)]
    return nn.Sequential(*layers)


_FACTORIES = {"linear": linear, "mlp": mlp, "convnet": convnet}


def make_model(name: str, in_shape: Sequence[int], classes: int, **kwargs: object) -> nn.Module:
    """A fresh model by name: linear | mlp | convnet."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(_FACTORIES)}")
    return _FACTORIES[name](tuple(in_shape), classes, **kwargs)  # type: ignore[operator]


def seeded(seed: int, factory: Callable[..., Built], *args: Any, **kwargs: Any) -> Built:
    """``factory(*args, **kwargs)`` with the global random state seeded by ``seed`` inside a fork
    of the CPU random state: a CPU initialization depends on the seed only, and the caller's CPU
    random state is left as it was (``torch.manual_seed`` also reseeds CUDA, which is not
    restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(*args, **kwargs)
