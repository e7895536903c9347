"""Multi-task hyper-representation: a linear encoder W shared by m regression tasks (upper level),
one ridge head theta_i per task (the blocks of the lower level),

    theta_i*(W) = argmin_theta 1/(2 n) ||X_i W theta - y_i||^2 + lam/2 ||theta||^2,
    min_W F(W) = (1/m) sum_i 1/(2 n_val) ||X_i^val W theta_i*(W) - y_i^val||^2,

on synthetic tasks with a common low-rank structure: y = X B* t_i + noise, B* in R^{d x r} with
orthonormal columns drawn once (seed), t_i ~ N(0, I_r) per task, x ~ N(0, I_d). With fewer
training examples per task than features (n < d), a task alone cannot be fit; the shared encoder
learns the r-dimensional subspace from all tasks (Franceschi et al. 2018, Section 4; Tripuraneni
et al. 2021). Each head's solution is closed-form, so the monitor reports F at the exact heads."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

__all__ = ["lower_objective", "monitor", "task_data", "upper_objective"]

DIM, RANK, NOISE = 20, 5, 0.1


@lru_cache(maxsize=4)
def _subspace(seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, RANK, generator=gen, dtype=torch.float64))
    return q


@lru_cache(maxsize=4096)
def _task(task: int, part: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + task)
    head = torch.randn(RANK, generator=gen, dtype=torch.float64)
    offset = {"train": 1, "val": 2, "test": 3}[part]
    gen = torch.Generator().manual_seed((seed * 1_000_003 + task) * 7 + offset)
    x = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    y = x @ (_subspace(seed) @ head) + NOISE * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def task_data(task: int = 0, part: str = "train", n: int = 10, seed: int = 0) -> dict[str, Tensor]:
    """Task ``task``'s examples of ``part`` (train, val or test): {"x": (n, d), "y": (n,)}."""
    x, y = _task(int(task), part, n, seed)
    return {"x": x, "y": y}


def lower_objective(upper: Any, lower: Any, batch: dict[str, Tensor], lam: float = 0.1) -> Tensor:
    """g_i: the head's ridge loss on the task's training examples."""
    pred = batch["x"] @ upper["W"] @ lower["theta"]
    return 0.5 * ((pred - batch["y"]) ** 2).mean() + 0.5 * lam * (lower["theta"] ** 2).sum()


def upper_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """f_i: the head's squared error on the task's validation examples."""
    pred = batch["x"] @ upper["W"] @ lower["theta"]
    return 0.5 * ((pred - batch["y"]) ** 2).mean()


def exact_heads(W: Tensor, tasks: int, n: int, seed: int, lam: float) -> Tensor:
    """theta_i*(W) of every task, by the normal equations."""
    heads = []
    for i in range(tasks):
        x, y = _task(i, "train", n, seed)
        phi = x @ W.to(x.dtype)
        system = phi.T @ phi / n + lam * torch.eye(W.shape[1], dtype=x.dtype)
        heads.append(torch.linalg.solve(system, phi.T @ y / n))
    return torch.stack(heads)


def _mean_loss(W: Tensor, heads: Tensor, part: str, n: int, seed: int) -> float:
    total = 0.0
    for i, head in enumerate(heads):
        x, y = _task(i, part, n, seed)
        total += 0.5 * float(((x @ W.to(x.dtype) @ head.to(x.dtype) - y) ** 2).mean())
    return total / len(heads)


def monitor(upper: Any, lower: Any, step: int = 0, out_dir: Any = None, tasks: int = 100, n_train: int = 10,
            n_val: int = 10, n_test: int = 50, seed: int = 0, lam: float = 0.1) -> dict[str, float]:
    """F over every task at the tracked heads, F(W) at the exact heads theta_i*(W) (what the
    methods are compared on), and the test error at the exact heads."""
    W = upper["W"].detach()
    heads = exact_heads(W, tasks, n_train, seed, lam)
    return {
        "upper_tracked": _mean_loss(W, lower["theta"].detach(), "val", n_val, seed),
        "upper_exact": _mean_loss(W, heads, "val", n_val, seed),
        "test_exact": _mean_loss(W, heads, "test", n_test, seed),
    }
