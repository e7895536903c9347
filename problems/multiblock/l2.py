"""One L2 strength per task over many tasks: m binary digit tasks (a pair of digit classes and a
sample of their images each), a logistic-regression model per task downstairs (the blocks of the
lower level) and the vector of log L2 strengths upstairs, entry i for task i,

    w_i*(lam) = argmin_w mean_train log(1 + exp(-s w^T [1, x])) + exp(lam_i)/2 ||w||^2,
    min_lam F(lam) = (1/m) sum_i mean_val log(1 + exp(-s w_i*(lam)^T [1, x])),

the per-task regularization of the paper's hyperparameter-optimization experiment (Hu et al.
2023, Section 6.1, there one temperature per task on a8a / w8a). Task i uses the class pair
i mod 45 of the 45 digit pairs and its own random sample of 40 training and 40 validation images
(bundled with scikit-learn; nothing is downloaded); pixels are scaled to [0, 1]."""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from problems.common.data import bundled

__all__ = ["lower_objective", "monitor", "task_data", "upper_objective"]

PAIRS = tuple(itertools.combinations(range(10), 2))


@lru_cache(maxsize=4096)
def _task(task: int, n: int, seed: int) -> dict[str, dict[str, Tensor]]:
    features, labels = bundled("digits")
    a, b = PAIRS[task % len(PAIRS)]
    rows = torch.nonzero((labels == a) | (labels == b)).flatten()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + task)
    rows = rows[torch.randperm(len(rows), generator=gen)]
    x = torch.cat([torch.ones(len(rows), 1, dtype=torch.float64), features[rows] / 16.0], dim=1)
    s = torch.where(labels[rows] == a, 1.0, -1.0).to(torch.float64)
    parts = {"train": slice(0, n), "val": slice(n, 2 * n), "test": slice(2 * n, None)}
    return {part: {"x": x[cut], "s": s[cut]} for part, cut in parts.items()}


def task_data(task: int = 0, part: str = "train", n: int = 40, seed: int = 0) -> dict[str, Tensor]:
    """Task ``task``'s examples of ``part``: {"x": (n, 65) with a leading 1, "s": (n,) labels +-1}."""
    return dict(_task(int(task), n, seed)[part])


def _logistic(w: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return torch.nn.functional.softplus(-batch["s"] * (batch["x"] @ w)).mean()


def lower_objective(upper: Any, lower: Any, batch: dict[str, Tensor], task: Tensor | float = 0) -> Tensor:
    """g_i: the task's training loss with L2 strength exp(lam[task])."""
    strength = upper["log_l2"][torch.as_tensor(task).long()].exp()
    return _logistic(lower["w"], batch) + 0.5 * strength * (lower["w"] ** 2).sum()


def upper_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """f_i: the task's validation loss."""
    return _logistic(lower["w"], batch)


def monitor(upper: Any, lower: Any, step: int = 0, out_dir: Any = None, tasks: int = 100, n: int = 40,
            seed: int = 0) -> dict[str, float]:
    """The mean validation and test losses and test accuracy over every task at the tracked models."""
    w = lower["w"].detach()
    val = test = accuracy = 0.0
    for i in range(tasks):
        parts = _task(i, n, seed)
        val += float(_logistic(w[i], parts["val"]))
        test += float(_logistic(w[i], parts["test"]))
        accuracy += float(((parts["test"]["x"] @ w[i]) * parts["test"]["s"] > 0).double().mean())
    return {"val_loss": val / tasks, "test_loss": test / tasks, "test_accuracy": accuracy / tasks,
            "mean_log_l2": float(upper["log_l2"].mean())}
