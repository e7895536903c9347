"""The quadratic toy with a best-response model downstairs, for the STN engine.

    G(x, y) = 1/2 y^T A y - y^T B x,    F(x, y) = 1/2 ||y - c||^2 + rho/2 ||x||^2,    y*(x) = A^{-1} B x

y*(x) is affine in x, so the STN tensor y_phi(x) = y_elem + diag(y_hyper) V x (``bilevel.stn.StnTensor``)
can represent it exactly, and since F is quadratic the Gaussian perturbation only adds a constant
to E F: STN's fixed point is the true x* = (M^T M + rho I)^{-1} M^T c, M = A^{-1} B."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.spec import BilevelSpec
from bilevel.stn import hyper_input

__all__ = ["quadratic_stn_lower", "quadratic_stn_spec", "quadratic_stn_upper"]


def quadratic_stn_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    y, x = lower["y"](hyper_input(upper)), upper["x"]
    return 0.5 * y @ (batch["A"] @ y) - y @ (batch["B"] @ x)


def quadratic_stn_upper(upper: Any, lower: Any, batch: dict[str, Tensor], rho: float = 0.1) -> Tensor:
    y, x = lower["y"](hyper_input(upper)), upper["x"]
    return 0.5 * ((y - batch["c"]) ** 2).sum() + 0.5 * rho * (x**2).sum()


def quadratic_stn_spec(
    n: int = 8, m: int = 3, seed: int = 0, rho: float = 0.1, train_steps: int = 2, inner_lr: float = 0.01,
    outer: dict[str, Any] | None = None, **run: Any,
) -> BilevelSpec:
    """The quadratic toy with x a (continuous, unbounded) hyperparameter starting at 0 and y an
    StnTensor; ``train_steps`` Adam steps on phi per outer step (plain GD fits the bilinear
    parametrization of the response slowly)."""
    data = {"source": "problems.toy:quadratic_data", "kwargs": {"n": n, "m": m, "seed": seed}}
    return BilevelSpec.model_validate(
        {
            "name": "toy-quadratic-stn",
            "levels": {
                "upper": {
                    "variables": {"x": {"kind": "hyperparameter", "shape": [m], "init": 0.0}},
                    "objective": "problems.toy.stn:quadratic_stn_upper",
                    "objective_kwargs": {"rho": rho},
                    "data": data,
                    "solver": outer or {"name": "adam", "lr": 0.05, "schedule": "cosine"},
                },
                "lower": {
                    "parent": "upper",
                    "variables": {"y": {"kind": "module", "factory": "bilevel.stn:StnTensor", "kwargs": {"shape": [n], "n_hyper": m}}},
                    "objective": "problems.toy.stn:quadratic_stn_lower",
                    "data": data,
                    "solver": {"name": "adam", "lr": inner_lr, "steps": train_steps},
                    "assumptions": {"convexity": "strongly_convex", "smoothness": "bounded"},
                },
            },
            "engine": {"kind": "stn"},
            "run": {"dtype": "float64", "device": "cpu", "seed": seed, **run},
        }
    )
