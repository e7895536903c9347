"""Two problems whose right discrete hyperparameter is known, for the STN engine.

Active features (integer k in [1, 10]): linear regression on 10 features of which only the first
3 carry signal, with 14 training examples. A model restricted to the first k features underfits
for k < 3 and fits noise for k > 3, so the validation loss is smallest at k = 3 (checked against
least squares in the test). The value k is used by both objectives (a direct, non-differentiable
use: REINFORCE is the estimator that sees it).

Robust loss (categorical in {squared, absolute}): the same regression with a fifth of the training
targets replaced by large outliers; the validation targets are clean. Fitting the absolute error
ignores the outliers, so "absolute" is the right choice. The choice shapes training only."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from bilevel.stn import hyper_input

D, SIGNAL = 10, 3


@lru_cache(maxsize=4)
def _regression(n_train: int = 14, n_val: int = 200, seed: int = 0, outliers: float = 0.0) -> dict[str, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(D, dtype=torch.float64)
    w[:SIGNAL] = torch.tensor([2.0, -1.5, 1.0], dtype=torch.float64)
    X = torch.randn(n_train + n_val, D, generator=gen, dtype=torch.float64)
    t = X @ w + 1.0 * torch.randn(n_train + n_val, generator=gen, dtype=torch.float64)
    train_t = t[:n_train].clone()
    if outliers:
        n_bad = int(outliers * n_train)
        train_t[:n_bad] += 20.0 * torch.sign(torch.randn(n_bad, generator=gen, dtype=torch.float64))
    return {"train": {"X": X[:n_train], "t": train_t}, "val": {"X": X[n_train:], "t": t[n_train:]}}


def train_data(**kwargs: Any) -> dict[str, Tensor]:
    return dict(_regression(**kwargs)["train"])


def val_data(**kwargs: Any) -> dict[str, Tensor]:
    return dict(_regression(**kwargs)["val"])


def _masked_prediction(upper: Any, lower: Any, X: Tensor) -> Tensor:
    mask = (torch.arange(D, device=X.device) < upper["k"]).to(X.dtype)
    return X @ (mask * lower["w"](hyper_input(upper)))


def features_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return ((_masked_prediction(upper, lower, batch["X"]) - batch["t"]) ** 2).mean()


def features_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return ((_masked_prediction(upper, lower, batch["X"]) - batch["t"]) ** 2).mean()


def robust_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    residual = batch["X"] @ lower["w"](hyper_input(upper)) - batch["t"]
    absolute = upper["absolute"].to(residual.dtype)  # a 0-d boolean tensor: no host synchronization
    return (absolute * residual.abs() + (1 - absolute) * residual**2).mean()


def robust_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return ((batch["X"] @ lower["w"](hyper_input(upper)) - batch["t"]) ** 2).mean()


def features_spec(steps: int = 400, seed: int = 0, **engine: Any) -> dict[str, Any]:
    here = __file__
    return {
        "name": "active-features",
        "levels": {
            "upper": {
                "variables": {"k": {"kind": "hyperparameter", "type": "integer", "low": 1, "high": D, "init": 8}},
                "objective": f"{here}:features_upper",
                "data": {"source": f"{here}:val_data"},
                "solver": {"name": "adam", "lr": 0.1, "schedule": "cosine", "final_lr_ratio": 0.1},
            },
            "lower": {
                "parent": "upper",
                "variables": {"w": {"kind": "module", "factory": "bilevel.stn:StnTensor", "kwargs": {"shape": [D], "n_hyper": 1}}},
                "objective": f"{here}:features_lower",
                "data": {"source": f"{here}:train_data"},
                "solver": {"name": "adam", "lr": 0.05, "steps": 2},
            },
        },
        "engine": {"kind": "stn", **engine} if engine else {"kind": "auto"},
        "run": {"dtype": "float64", "device": "cpu", "seed": seed, "steps": steps, "checkpoint_every": None},
    }


def robust_spec(steps: int = 300, seed: int = 0, **engine: Any) -> dict[str, Any]:
    here = __file__
    data = {"n_train": 40, "outliers": 0.2}
    return {
        "name": "robust-loss",
        "levels": {
            "upper": {
                "variables": {"absolute": {"kind": "hyperparameter", "type": "categorical", "choices": [False, True], "init": False}},
                "objective": f"{here}:robust_upper",
                "data": {"source": f"{here}:val_data", "kwargs": data},
                "solver": {"name": "adam", "lr": 0.1, "schedule": "cosine", "final_lr_ratio": 0.1},
            },
            "lower": {
                "parent": "upper",
                "variables": {"w": {"kind": "module", "factory": "bilevel.stn:StnTensor", "kwargs": {"shape": [D], "n_hyper": 2}}},
                "objective": f"{here}:robust_lower",
                "data": {"source": f"{here}:train_data", "kwargs": data},
                "solver": {"name": "adam", "lr": 0.05, "steps": 2},
            },
        },
        "engine": {"kind": "stn", **engine} if engine else {"kind": "auto"},
        "run": {"dtype": "float64", "device": "cpu", "seed": seed, "steps": steps, "checkpoint_every": None},
    }
