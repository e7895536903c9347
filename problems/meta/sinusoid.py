"""Few-shot sinusoid regression (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for
Fast Adaptation of Deep Networks", ICML, section 5.1).

A task is y = A sin(x - phase) with A ~ U[0.1, 5] and phase ~ U[0, pi]; its support and query
sets hold K points each with x ~ U[-5, 5] (meta-test: the query is a 100-point grid on [-5, 5]).
The model is an MLP with two hidden layers of 40 ReLU units; the task loss is the mean squared
error. The upper variables are the meta-parameters (the initialization theta; for ANIL the body
and the head's initialization; for Meta-SGD also a learning rate per parameter), the task level's
the adapted copy (see README.md for each method's spec)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["anil_query_mse", "anil_support_mse", "body", "head", "mlp", "query_mse", "sinusoid_tasks", "support_mse"]


def sinusoid_tasks(count: int, generator: torch.Generator, shots: int = 10, query_shots: int | None = None,
                   query_grid: int | None = None, amplitude: Sequence[float] = (0.1, 5.0),
                   phase: Sequence[float] = (0.0, math.pi), x_range: Sequence[float] = (-5.0, 5.0)) -> dict[str, dict[str, Tensor]]:
    """``count`` tasks: ``shots`` support points each and ``query_shots`` (default: ``shots``) query
    points, or a ``query_grid`` of evenly spaced query points (meta-test). Tensors (count, n, 1)."""
    def uniform(shape: tuple[int, ...], bounds: Sequence[float]) -> Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    a = uniform((count, 1, 1), amplitude)
    b = uniform((count, 1, 1), phase)
    xs = uniform((count, shots, 1), x_range)
    if query_grid is not None:
        xq = torch.linspace(x_range[0], x_range[1], query_grid, dtype=torch.float64).reshape(1, -1, 1).expand(count, -1, -1)
    else:
        xq = uniform((count, query_shots or shots, 1), x_range)
    return {"support": {"x": xs, "y": a * torch.sin(xs - b)}, "query": {"x": xq, "y": a * torch.sin(xq - b)}}


def mlp(sizes: Sequence[int] = (1, 40, 40, 1)) -> nn.Module:
    """Linear layers of the given widths with ReLU between them."""
    layers: list[nn.Module] = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def body(sizes: Sequence[int] = (1, 40, 40)) -> nn.Module:
    """The feature extractor of ANIL: the MLP without its last layer (ReLU after each layer)."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def head(features: int = 40, outputs: int = 1) -> nn.Module:
    """The last layer, adapted per task by ANIL."""
    return nn.Linear(features, outputs)


def _mse(prediction: Tensor, target: Tensor) -> Tensor:
    return ((prediction - target) ** 2).mean()


def support_mse(upper: Any, lower: Any, batch: dict[str, Tensor], model: str = "phi") -> Tensor:
    """The task loss of the adapted model on the support set (the task level's objective)."""
    return _mse(lower[model](batch["x"]), batch["y"])


def query_mse(upper: Any, lower: Any, batch: dict[str, Tensor], model: str = "phi") -> Tensor:
    """The adapted model's loss on the query set (the meta-objective, per task)."""
    return _mse(lower[model](batch["x"]), batch["y"])


def anil_support_mse(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """ANIL's task loss: the shared body's features, the adapted head."""
    return _mse(lower["head"](upper["body"](batch["x"])), batch["y"])


def anil_query_mse(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return _mse(lower["head"](upper["body"](batch["x"])), batch["y"])
