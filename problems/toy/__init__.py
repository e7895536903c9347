"""Bilevel problems with closed-form hypergradients: the oracles every engine is tested against.

Quadratic (any m, n):
    G(x, y) = 1/2 y^T A y - y^T B x,            A symmetric positive definite
    F(x, y) = 1/2 ||y - c||^2 + rho/2 ||x||^2
    y*(x) = A^{-1} B x,   dF/dx = rho x + B^T A^{-1} (y*(x) - c).

Ridge regression with learned L2 strengths (Pedregosa 2016; per-feature or one scalar):
    G(lam, w) = 1/(2n) ||X w - t||^2 + 1/2 sum_j exp(lam_j) w_j^2
    F(lam, w) = 1/(2n_v) ||X_v w - t_v||^2
    H = X^T X / n + diag(exp(lam)),  w* = H^{-1} X^T t / n,
    dF/dlam = -exp(lam) * w* * (H^{-1} X_v^T (X_v w* - t_v) / n_v)   (summed over j for a scalar lam).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.spec import BilevelSpec

__all__ = [
    "quadratic_data",
    "quadratic_hypergrad",
    "quadratic_lower",
    "quadratic_spec",
    "quadratic_upper",
    "ridge_data",
    "ridge_hypergrad",
    "ridge_lower",
    "ridge_solution",
    "ridge_spec",
    "ridge_upper",
    "ridge_val_data",
]


# --- quadratic --------------------------------------------------------------------------------
def quadratic_data(n: int = 8, m: int = 3, seed: int = 0, condition: float = 10.0) -> dict[str, Tensor]:
    """A (n x n, eigenvalues in [1, condition]), B (n x m), c (n): all with first dimension n."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(1.0, condition, n, dtype=torch.float64)
    return {
        "A": q @ torch.diag(eig) @ q.T,
        "B": torch.randn(n, m, generator=gen, dtype=torch.float64),
        "c": torch.randn(n, generator=gen, dtype=torch.float64),
    }


def quadratic_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    y, x = lower["y"], upper["x"]
    return 0.5 * y @ (batch["A"] @ y) - y @ (batch["B"] @ x)


def quadratic_upper(upper: Any, lower: Any, batch: dict[str, Tensor], rho: float = 0.1) -> Tensor:
    y, x = lower["y"], upper["x"]
    return 0.5 * ((y - batch["c"]) ** 2).sum() + 0.5 * rho * (x**2).sum()


def quadratic_hypergrad(x: Tensor, data: dict[str, Tensor], rho: float = 0.1) -> Tensor:
    """Closed-form dF/dx."""
    A, B, c = (data[k].to(x) for k in ("A", "B", "c"))
    y = torch.linalg.solve(A, B @ x)
    return rho * x + B.T @ torch.linalg.solve(A, y - c)


def quadratic_spec(
    n: int = 8, m: int = 3, seed: int = 0, rho: float = 0.1, inner_steps: int = 400, inner_lr: float = 0.09, **run: Any
) -> BilevelSpec:
    """A spec for the quadratic problem (inner GD lr below 2 / condition converges)."""
    data = {"source": "problems.toy:quadratic_data", "kwargs": {"n": n, "m": m, "seed": seed}}
    return BilevelSpec.model_validate(
        {
            "name": "toy-quadratic",
            "levels": {
                "upper": {
                    "variables": {"x": {"shape": [m], "init": "normal"}},
                    "objective": "problems.toy:quadratic_upper",
                    "objective_kwargs": {"rho": rho},
                    "data": data,
                    "solver": {"name": "sgd", "lr": 0.1},
                },
                "lower": {
                    "parent": "upper",
                    "variables": {"y": {"shape": [n]}},
                    "objective": "problems.toy:quadratic_lower",
                    "data": data,
                    "solver": {"name": "sgd", "lr": inner_lr, "steps": inner_steps, "warm_start": False},
                    "assumptions": {"convexity": "strongly_convex", "smoothness": "bounded"},
                },
            },
            "run": {"dtype": "float64", "device": "cpu", "seed": seed, **run},
        }
    )


# --- ridge ------------------------------------------------------------------------------------
def _ridge_arrays(n: int, d: int, seed: int, noise: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64) * (torch.rand(d, generator=gen, dtype=torch.float64) > 0.5)
    X = torch.randn(2 * n, d, generator=gen, dtype=torch.float64)
    t = X @ w_true + noise * torch.randn(2 * n, generator=gen, dtype=torch.float64)
    return X[:n], t[:n], X[n:], t[n:]


def ridge_data(n: int = 40, d: int = 10, seed: int = 0, noise: float = 0.5) -> dict[str, Tensor]:
    """Training split {X, t}."""
    X, t, _, _ = _ridge_arrays(n, d, seed, noise)
    return {"X": X, "t": t}


def ridge_val_data(n: int = 40, d: int = 10, seed: int = 0, noise: float = 0.5) -> dict[str, Tensor]:
    """Validation split {X, t}."""
    _, _, X, t = _ridge_arrays(n, d, seed, noise)
    return {"X": X, "t": t}


def ridge_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    w, lam = lower["w"], upper["lam"]
    residual = batch["X"] @ w - batch["t"]
    return 0.5 * (residual**2).mean() + 0.5 * (torch.exp(lam) * w**2).sum()


def ridge_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    residual = batch["X"] @ lower["w"] - batch["t"]
    return 0.5 * (residual**2).mean()


def ridge_solution(lam: Tensor, train: dict[str, Tensor]) -> Tensor:
    X, t = train["X"].to(lam), train["t"].to(lam)
    d = X.shape[1]
    H = X.T @ X / X.shape[0] + torch.diag(torch.exp(lam) * torch.ones(d, dtype=lam.dtype))
    return torch.linalg.solve(H, X.T @ t / X.shape[0])


def ridge_hypergrad(lam: Tensor, train: dict[str, Tensor], val: dict[str, Tensor]) -> Tensor:
    """Closed-form dF/dlam (lam a scalar or one entry per feature)."""
    X, t = train["X"].to(lam), train["t"].to(lam)
    Xv, tv = val["X"].to(lam), val["t"].to(lam)
    d = X.shape[1]
    H = X.T @ X / X.shape[0] + torch.diag(torch.exp(lam) * torch.ones(d, dtype=lam.dtype))
    w = torch.linalg.solve(H, X.T @ t / X.shape[0])
    v = torch.linalg.solve(H, Xv.T @ (Xv @ w - tv) / Xv.shape[0])
    per_feature = -torch.exp(lam) * w * v
    return per_feature.sum() if lam.dim() == 0 else per_feature


def ridge_spec(
    n: int = 40, d: int = 10, seed: int = 0, per_feature: bool = True, inner_steps: int = 500, inner_lr: float = 0.2, **run: Any
) -> BilevelSpec:
    """A spec for ridge regression with learned (log) L2 strengths."""
    kwargs = {"n": n, "d": d, "seed": seed}
    return BilevelSpec.model_validate(
        {
            "name": "toy-ridge",
            "levels": {
                "upper": {
                    "variables": {"lam": {"shape": [d] if per_feature else [], "init": -1.0}},
                    "objective": "problems.toy:ridge_upper",
                    "data": {"source": "problems.toy:ridge_val_data", "kwargs": kwargs},
                    "solver": {"name": "adam", "lr": 0.05},
                },
                "lower": {
                    "parent": "upper",
                    "variables": {"w": {"shape": [d]}},
                    "objective": "problems.toy:ridge_lower",
                    "data": {"source": "problems.toy:ridge_data", "kwargs": kwargs},
                    "solver": {"name": "sgd", "lr": inner_lr, "steps": inner_steps, "warm_start": False},
                    "assumptions": {"convexity": "strongly_convex", "smoothness": "bounded"},
                },
            },
            "run": {"dtype": "float64", "device": "cpu", "seed": seed, **run},
        }
    )
