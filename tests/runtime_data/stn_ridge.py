"""Ridge regression whose weights are a best-response model (an StnTensor), for the STN engine.

    G(lam, phi) = 1/2 mean_train (x^T w_phi(h) - t)^2 + wd/2 ||phi||^2,    F = 1/2 mean_val (x^T w_phi(h) - t)^2

with wd the inner solver's weight decay tuned by a log-scale hyperparameter (``solver.tuned``) and
h = hyper_input(upper) the conditioning. Optionally an integer k keeps the first k features only
(in both objectives: a direct use of a discrete value, scored by REINFORCE). Both objectives are
means over the batch's examples, so a data-parallel run's shards add up to the union."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.stn import hyper_input

HERE = __file__


def _weights(upper: Any, lower: Any) -> Tensor:
    w = lower["w"](hyper_input(upper))
    if "k" in upper:
        w = w * (torch.arange(w.shape[0], device=w.device) < upper["k"]).to(w.dtype)
    return w


def lower_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return 0.5 * ((batch["X"] @ _weights(upper, lower) - batch["t"]) ** 2).mean()


def upper_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return 0.5 * ((batch["X"] @ _weights(upper, lower) - batch["t"]) ** 2).mean()


def spec(n: int = 41, d: int = 6, wd: float = 1e-3, k: int | None = None, steps: int = 10, seed: int = 0,
         noise: float = 0.5, **engine: Any) -> dict[str, Any]:
    """The ridge data of problems.toy (n training and n validation examples), wd in [1e-5, 10]
    starting at ``wd``, k in [1, d] starting at ``k`` when given; 2 Adam steps on phi per outer step."""
    data = {"kwargs": {"n": n, "d": d, "seed": seed, "noise": noise}}
    variables: dict[str, Any] = {"wd": {"kind": "hyperparameter", "log": True, "low": 1e-5, "high": 10.0, "init": wd}}
    if k is not None:
        variables["k"] = {"kind": "hyperparameter", "type": "integer", "low": 1, "high": d, "init": k}
    return {
        "name": "stn-ridge",
        "levels": {
            "upper": {
                "variables": variables,
                "objective": f"{HERE}:upper_objective",
                "data": {"source": "problems.toy:ridge_val_data", **data},
                "solver": {"name": "adam", "lr": 0.05},
            },
            "lower": {
                "parent": "upper",
                "variables": {"w": {"kind": "module", "factory": "bilevel.stn:StnTensor",
                                    "kwargs": {"shape": [d], "n_hyper": 1 + (k is not None)}}},
                "objective": f"{HERE}:lower_objective",
                "data": {"source": "problems.toy:ridge_data", **data},
                "solver": {"name": "adam", "lr": 0.05, "steps": 2, "tuned": {"weight_decay": "wd"}},
                "assumptions": {"convexity": "strongly_convex"},
            },
        },
        "engine": {"kind": "stn", **engine},
        "run": {"dtype": "float64", "device": "cpu", "seed": seed, "steps": steps},
    }
