"""The coupled-constraint toy problem of LV-HBA (Yao et al. 2024, Section 5.1), n = 100:

    min_{x, y}  1/2 ||x - y2||^2 + 1/2 ||y1 - 1||^2
    s.t.  y = (y1, y2) in argmin_{y'}  1/2 ||y1'||^2 - x^T y1' + 1^T y2'   s.t.  1^T x + 1^T y1' + 1^T y2' = 0.

The lower level is convex but not strongly convex (linear in y2) and its constraint couples both
levels. Lower optimality: y1 = x - mu, 1 + mu = 0 (mu the multiplier, -1); with the constraint and
symmetry the upper problem reduces to min_a (3a + 1)^2 / 2 + a^2 / 2, so

    x* = -0.3 (every entry),  y1* = 0.7,  y2* = -0.4,  multiplier -1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.reporting.optimum import KNOWN_OPTIMUM, known_optimum

__all__ = ["OPTIMUM_TOLERANCE", "SOLUTION", "constraint", "lower_objective", "relative_error", "report", "upper_objective"]

SOLUTION = {"x": -0.3, "y1": 0.7, "y2": -0.4, "multiplier": -1.0}


def upper_objective(upper: Any, lower: Any, batch: Any) -> Tensor:
    return 0.5 * ((upper["x"] - lower["y2"]) ** 2).sum() + 0.5 * ((lower["y1"] - 1) ** 2).sum()


def lower_objective(upper: Any, lower: Any, batch: Any) -> Tensor:
    return 0.5 * (lower["y1"] ** 2).sum() - upper["x"] @ lower["y1"] + lower["y2"].sum()


def constraint(upper: Any, lower: Any, batch: Any) -> Tensor:
    """1^T x + 1^T y1 + 1^T y2 (== 0), coupled and affine."""
    return (upper["x"].sum() + lower["y1"].sum() + lower["y2"].sum()).reshape(1)


def relative_error(x: Tensor) -> float:
    """||x - x*|| / ||x*||, the figure the paper reports."""
    target = torch.full_like(x, SOLUTION["x"])
    return float((x - target).norm() / target.norm())


OPTIMUM_TOLERANCE = 0.03
"""Relative error of x that counts as having reached x*: the paper's figure after 5000
iterations (0.025), with a margin."""


def report(upper: Any, lower: Any) -> dict[str, Any]:
    error = relative_error(upper["x"])
    return {
        "x_relative_error": error,
        "y1_mean": float(lower["y1"].mean()),
        "y2_mean": float(lower["y2"].mean()),
        "constraint": float(constraint(upper, lower, None)),
        KNOWN_OPTIMUM: known_optimum("x* = -0.3", error, OPTIMUM_TOLERANCE, "relative error ||x - x*|| / ||x*||"),
    }
