"""The analytic toy of DARTS-family methods (Liu et al. 2019; Xue et al. 2021), with closed forms.

    L_train(alpha, w) = (w - alpha)^2          (lower: w*(alpha) = alpha)
    L_val(alpha, w)   = alpha w - 2 alpha + 1  (upper: L_val(alpha, alpha) = (alpha - 1)^2)

The bilevel optimum is (alpha, w) = (1, 1). Fixed points of the alternating methods:

* first-order DARTS (grad_alpha L_val = w - 2 = 0, w = alpha):          (2, 2);
* second-order DARTS with virtual step xi (w' = w - 2 xi (w - alpha)):
  d/dalpha L_val(alpha, w'(alpha)) = w' - 2 + 2 xi alpha = 0, w = alpha:  alpha = 2 / (1 + 2 xi), exact at xi = 1/2;
* RARTS (lam, beta): alpha = 2 / (2 - 1/beta - 1/(2 lam)), w = alpha (1 - 1/(2 lam)), y = 2 - alpha,
  tending to (1, 1) as lam, beta grow.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.spec import BilevelSpec

__all__ = ["darts_fixed_point", "rarts_fixed_point", "toy_spec", "train_loss", "val_loss"]


def train_loss(upper: Any, lower: Any, batch: Any) -> Tensor:
    return (lower["w"] - upper["alpha"]) ** 2


def val_loss(upper: Any, lower: Any, batch: Any) -> Tensor:
    alpha = upper["alpha"]
    return alpha * lower["w"] - 2 * alpha + 1


def darts_fixed_point(order: int, xi: float) -> tuple[float, float]:
    """(alpha, w) where first- or second-order DARTS comes to rest."""
    alpha = 2.0 if order == 1 else 2.0 / (1.0 + 2.0 * xi)
    return alpha, alpha


def rarts_fixed_point(lam: float, beta: float) -> tuple[float, float, float]:
    """(alpha, w, y) where RARTS comes to rest (the stationary point of its relaxed objective)."""
    alpha = 2.0 / (2.0 - 1.0 / beta - 1.0 / (2.0 * lam))
    return alpha, alpha * (1.0 - 1.0 / (2.0 * lam)), 2.0 - alpha


def toy_spec(steps: int = 2000, inner_lr: float = 0.1, outer_lr: float = 0.05, alpha0: float = 0.0, w0: float = 0.0,
             **run: Any) -> BilevelSpec:
    """The toy as a spec (float64, scalar variables, sgd at both levels, one w step per outer step)."""
    return BilevelSpec.model_validate({
        "name": "darts-toy",
        "levels": {
            "upper": {"variables": {"alpha": {"shape": [], "init": alpha0}}, "objective": "problems.nas.toy:val_loss",
                      "solver": {"name": "sgd", "lr": outer_lr}},
            "lower": {"parent": "upper", "variables": {"w": {"shape": [], "init": w0}},
                      "objective": "problems.nas.toy:train_loss",
                      "solver": {"name": "sgd", "lr": inner_lr, "steps": 1}},
        },
        "run": {"device": "cpu", "dtype": "float64", "steps": steps, "checkpoint_every": None, "log_every": 1000,
                "out": "runs/darts-toy", **run},
    })
