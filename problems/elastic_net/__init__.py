"""Elastic-net strengths tuned through an external solver: a non-differentiable lower level.

Diabetes progression (scikit-learn's bundled diabetes data: 442 patients, 10 features), split 150
train / 150 validation / 142 test, features standardized with the training statistics, targets
centered:

    lower:  w*(a, b) = argmin_w 1/(2n) ||X w - t||^2 + a ||w||_1 + b/2 ||w||^2     (a, b >= 0)
    upper:  min_{a, b}  1/(2 n_v) ||X_v w*(a, b) - t_v||^2

The lower level is solved by cyclic coordinate descent in NumPy (``enet_solution``, the lower
level's closed-form ``solution``; Friedman, Hastie & Tibshirani 2010, "Regularization Paths for
Generalized Linear Models via Coordinate Descent"): no autograd graph connects w* to (a, b), and
the L1 term has no Hessian, so no gradient-based hypergradient applies. The strengths are
hyperparameter variables declared ``differentiable: false`` (engines that need gradients refuse
them), on a log scale; the zero-order engine estimates the hypergradient in their raw
(unconstrained) coordinates from evaluations of the validation loss alone. ``grid_search`` is
the baseline: the same solver on a log grid of (a, b)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from problems.common.data import shuffled_split

__all__ = ["enet_lower", "enet_report", "enet_solution", "enet_spec", "enet_upper", "grid_search", "split",
           "test_data", "train_data", "val_data"]


@lru_cache(maxsize=4)
def split(n_train: int = 150, n_val: int = 150, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """Shuffled diabetes splits {train, val, test} of {X, t} (float64), standardized and centered
    with the training part's statistics."""
    from sklearn.datasets import load_diabetes

    features, targets = load_diabetes(return_X_y=True)
    data = {"X": torch.as_tensor(features, dtype=torch.float64), "t": torch.as_tensor(targets, dtype=torch.float64)}
    parts = shuffled_split(data, n_train, n_val, seed)
    mean, std = parts["train"]["X"].mean(0), parts["train"]["X"].std(0)
    center = parts["train"]["t"].mean()
    return {name: {"X": (p["X"] - mean) / std, "t": (p["t"] - center) / 50.0} for name, p in parts.items()}


def train_data(**kw: Any) -> dict[str, Tensor]:
    return split(**kw)["train"]


def val_data(**kw: Any) -> dict[str, Tensor]:
    return split(**kw)["val"]


def test_data(**kw: Any) -> dict[str, Tensor]:
    return split(**kw)["test"]


def coordinate_descent(X: np.ndarray, t: np.ndarray, a: float, b: float, sweeps: int = 200, tol: float = 1e-9,
                       w: np.ndarray | None = None) -> np.ndarray:
    """Cyclic coordinate descent for 1/(2n) ||X w - t||^2 + a ||w||_1 + b/2 ||w||^2: each
    coordinate set to soft(X_j^T r_j / n, a) / (||X_j||^2 / n + b), r_j the residual without it,
    until no coordinate moves by more than ``tol`` in a sweep (or ``sweeps`` sweeps)."""
    n, d = X.shape
    w = np.zeros(d) if w is None else w.copy()
    norms = (X * X).sum(0) / n
    residual = t - X @ w
    for _ in range(sweeps):
        largest = 0.0
        for j in range(d):
            rho = X[:, j] @ residual / n + norms[j] * w[j]
            new = math.copysign(max(abs(rho) - a, 0.0), rho) / (norms[j] + b)
            residual += X[:, j] * (w[j] - new)
            largest = max(largest, abs(new - w[j]))
            w[j] = new
        if largest < tol:
            break
    return w


def _strengths(upper: Any) -> tuple[float, float]:
    return float(upper["l1"]), float(upper["l2"])


def enet_solution(upper: Any, lower: Any, batch: dict[str, Tensor], sweeps: int = 200) -> dict[str, Tensor]:
    """w* from the external solver (NumPy; detached from any graph)."""
    a, b = _strengths(upper)
    like = lower["w"]
    w = coordinate_descent(batch["X"].cpu().numpy(), batch["t"].cpu().numpy(), a, b, sweeps)
    return {"w": torch.as_tensor(w, dtype=like.dtype, device=like.device)}


def enet_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """The elastic-net objective (for the inner residual the stats report)."""
    w = lower["w"]
    fit = 0.5 * ((batch["X"] @ w - batch["t"]) ** 2).mean()
    return fit + upper["l1"] * w.abs().sum() + 0.5 * upper["l2"] * (w * w).sum()


def enet_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Validation loss 1/(2 n_v) ||X_v w - t_v||^2."""
    return 0.5 * ((batch["X"] @ lower["w"] - batch["t"]) ** 2).mean()


def _losses(w: np.ndarray, **data: Any) -> dict[str, float]:
    parts = split(**data)
    out = {}
    for name in ("val", "test"):
        X, t = parts[name]["X"].numpy(), parts[name]["t"].numpy()
        out[f"{name}_loss"] = float(0.5 * ((X @ w - t) ** 2).mean())
    return out


def enet_report(upper: Any, lower: Any, out_dir: Any = None, **data: Any) -> dict[str, Any]:
    """Validation and test losses, the strengths and the nonzero coefficients of the final w."""
    w = lower["w"].detach().cpu().numpy()
    a, b = _strengths(upper)
    return {**_losses(w, **data), "l1": a, "l2": b, "nonzeros": int((np.abs(w) > 0).sum())}


def grid_search(points: int = 15, low: float = 1e-4, high: float = 1.0, **data: Any) -> dict[str, float]:
    """The best (a, b) of a points x points log grid by validation loss, and its test loss."""
    parts = split(**data)
    X, t = parts["train"]["X"].numpy(), parts["train"]["t"].numpy()
    best: dict[str, float] = {"val_loss": float("inf")}
    for a in np.geomspace(low, high, points):
        for b in np.geomspace(low, high, points):
            losses = _losses(coordinate_descent(X, t, float(a), float(b)), **data)
            if losses["val_loss"] < best["val_loss"]:
                best = {**losses, "l1": float(a), "l2": float(b)}
    return best


def enet_spec(steps: int = 60, samples: int = 8, sigma: float = 0.3, lr: float = 0.3, seed: int = 0, **run: Any) -> Any:
    """The spec of ``elastic_net.yaml`` as a model (for tests and scripts)."""
    from bilevel.spec import spec_from_data

    data = {"n_train": 150, "n_val": 150, "seed": 0}
    strength = {"kind": "hyperparameter", "log": True, "low": 1e-4, "high": 1.0, "init": 0.1, "differentiable": False}
    return spec_from_data({
        "name": "elastic-net-zero-order",
        "levels": {
            "upper": {
                "variables": {"l1": strength, "l2": strength},
                "objective": "problems.elastic_net:enet_upper",
                "data": {"source": "problems.elastic_net:val_data", "kwargs": data},
                "solver": {"name": "adam", "lr": lr},
            },
            "lower": {
                "parent": "upper",
                "variables": {"w": {"shape": [10]}},
                "objective": "problems.elastic_net:enet_lower",
                "data": {"source": "problems.elastic_net:train_data", "kwargs": data},
                "solution": "problems.elastic_net:enet_solution",
                "assumptions": {"convexity": "convex"},
            },
        },
        "engine": {"kind": "zero_order", "method": "antithetic", "samples": samples, "sigma": sigma},
        "report": "problems.elastic_net:enet_report",
        "report_kwargs": data,
        "run": {"device": "cpu", "dtype": "float64", "seed": seed, "steps": steps, **run},
    })
