"""Objectives on the toy quadratic that autograd cannot differentiate usefully (the zero-order
engine's tests): a lower objective with a sort, an upper objective with an argmax.

    trimmed_lower = G(x, y) + 1/2 mean of the smallest half of the (y_i - 1/2)^2   (a sort)
    sign_error_upper = share of i with argmax(y_i, c_i) = 0, i.e. y_i > c_i  +  rho/2 ||x||^2

The first is differentiable almost everywhere (the sort permutes); the second is piecewise constant
in y, so every hypergradient engine sees only rho x."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from problems.toy import quadratic_lower

__all__ = ["sign_error_upper", "trimmed_lower"]


def trimmed_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    y = lower["y"]
    squares, _ = torch.sort((y - 0.5) ** 2)
    return quadratic_lower(upper, lower, batch) + 0.5 * squares[: y.shape[0] // 2].mean()


def sign_error_upper(upper: Any, lower: Any, batch: dict[str, Tensor], rho: float = 0.1) -> Tensor:
    y, x = lower["y"], upper["x"]
    above = torch.argmax(torch.stack([y, batch["c"]], dim=1), dim=1) == 0
    return above.to(y.dtype).mean() + 0.5 * rho * (x**2).sum()
