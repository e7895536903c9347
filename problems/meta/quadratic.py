"""Quadratic tasks with closed-form meta-gradients: the oracle of the meta-learning engines.

Task i has a support loss and a query loss on phi in R^d,

    G_i(phi) = 1/2 phi^T A_i phi - b_i^T phi,      F_i(phi) = 1/2 phi^T C_i phi - c_i^T phi,

with A_i, C_i symmetric positive definite. For the meta-parameters theta and k SGD steps of size
alpha from phi = theta (MAML), phi_k = (I - alpha A)^k theta + sum_j (I - alpha A)^j alpha b, and

    MAML:      dF_i/dtheta = (I - alpha A_i)^k (C_i phi_k - c_i)       (k = 1: the formula of the issue)
    FOMAML:    (C_i phi_k - c_i)                                         (the adaptation's Jacobian taken as I)
    k = 0:     C_i theta - c_i                                           (multi-task training)
    Meta-SGD:  phi_1 = theta - a * (A_i theta - b_i) with a learning rate per entry (a vector):
               dF/dtheta = (I - diag(a) A_i)^T (C_i phi_1 - c_i),  dF/da = -(A_i theta - b_i) * (C_i phi_1 - c_i)
    iMAML:     phi* = argmin G_i + lam/2 ||phi - theta||^2 = (A_i + lam I)^{-1} (b_i + lam theta),
               dF_i/dtheta = lam (A_i + lam I)^{-1} (C_i phi* - c_i)

and the meta-gradient of the mean over a meta-batch is the mean of the tasks' (float64)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["closed_forms", "quadratic_tasks", "support_loss", "query_loss", "task_spec"]


def quadratic_tasks(count: int, generator: torch.Generator, d: int = 4, condition: float = 5.0) -> dict[str, dict[str, Tensor]]:
    """``count`` tasks, each one "example" holding its matrices: A, C (count, 1, d, d), b, c (count, 1, d)."""
    def spd() -> Tensor:
        q, _ = torch.linalg.qr(torch.randn(count, d, d, generator=generator, dtype=torch.float64))
        eig = 1.0 + (condition - 1.0) * torch.rand(count, d, generator=generator, dtype=torch.float64)
        return (q @ torch.diag_embed(eig) @ q.transpose(1, 2)).unsqueeze(1)

    A, C = spd(), spd()
    b = torch.randn(count, 1, d, generator=generator, dtype=torch.float64)
    c = torch.randn(count, 1, d, generator=generator, dtype=torch.float64)
    return {"support": {"M": A, "v": b}, "query": {"M": C, "v": c}}


def _quadratic(phi: Tensor, batch: dict[str, Tensor]) -> Tensor:
    M, v = batch["M"][0], batch["v"][0]
    return 0.5 * phi @ (M @ phi) - v @ phi


def support_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return _quadratic(lower["phi"], batch)


def query_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return _quadratic(lower["phi"], batch)


def closed_forms(theta: Tensor, tasks: dict[str, dict[str, Tensor]], alpha: float | Tensor, steps: int,
                 lam: float | None = None) -> dict[str, Tensor]:
    """The mean meta-gradients over the tasks (see the module docstring): maml, fomaml, and with a
    vector ``alpha`` the Meta-SGD gradients in theta and alpha; with ``lam`` the iMAML one."""
    A, b = tasks["support"]["M"][:, 0], tasks["support"]["v"][:, 0]
    C, c = tasks["query"]["M"][:, 0], tasks["query"]["v"][:, 0]
    d = theta.shape[0]
    eye = torch.eye(d, dtype=theta.dtype)
    step = eye - (alpha.unsqueeze(-1) * A if isinstance(alpha, Tensor) else alpha * A)  # (count, d, d)
    phi = theta.expand(A.shape[0], d)
    for _ in range(steps):
        phi = phi - (alpha * (A @ phi.unsqueeze(-1)).squeeze(-1) - alpha * b)
    residual = (C @ phi.unsqueeze(-1)).squeeze(-1) - c
    back = residual
    for _ in range(steps):
        back = (step.transpose(1, 2) @ back.unsqueeze(-1)).squeeze(-1)
    out = {"maml": back.mean(0), "fomaml": residual.mean(0), "query_loss": (0.5 * (phi * (C @ phi.unsqueeze(-1)).squeeze(-1)).sum(-1)
                                                                              - (c * phi).sum(-1)).mean()}
    if isinstance(alpha, Tensor) and steps == 1:
        out["metasgd_alpha"] = (-((A @ theta) - b) * residual).mean(0)
    if lam is not None:
        star = torch.linalg.solve(A + lam * eye, (b + lam * theta).unsqueeze(-1)).squeeze(-1)
        r = (C @ star.unsqueeze(-1)).squeeze(-1) - c
        out["imaml"] = (lam * torch.linalg.solve(A + lam * eye, r.unsqueeze(-1)).squeeze(-1)).mean(0)
        out["imaml_solution"] = star
    return out


def task_spec(steps: int = 1, alpha: float = 0.1, meta_batch: int = 5, d: int = 4, engine: dict[str, Any] | None = None,
              prox: float | None = None, per_entry_lr: bool = False, seed: int = 0) -> dict[str, Any]:
    """The spec data of MAML (or its variants) on the quadratic tasks (float64)."""
    upper: dict[str, Any] = {"theta": {"shape": [d], "init": "normal"}}
    lower_solver: dict[str, Any] = {"name": "sgd", "lr": alpha, "steps": steps}
    if per_entry_lr:
        upper["alpha"] = {"shape": [d], "init": alpha}
        lower_solver["tuned"] = {"lr": "alpha"}
    task: dict[str, Any] = {"parent": "meta", "variables": {"phi": {"shape": [d]}}, "init_from": "theta",
                            "objective": "problems.meta.quadratic:support_loss", "solver": lower_solver}
    if prox is not None:
        task["prox"] = {"anchor": "theta", "lam": prox}
        task["assumptions"] = {"convexity": "strongly_convex"}
    return {
        "name": "meta-quadratic",
        "levels": {"meta": {"variables": upper, "objective": "problems.meta.quadratic:query_loss", "solver": {"name": "sgd", "lr": 0.1}},
                   "task": task},
        "tasks": {"sampler": "problems.meta.quadratic:quadratic_tasks", "kwargs": {"d": d}, "meta_batch": meta_batch,
                  "seed": seed, "test_tasks": 20},
        "engine": engine or {"kind": "auto"},
        "run": {"device": "cpu", "dtype": "float64", "seed": seed, "steps": 3, "checkpoint_every": None},
    }
