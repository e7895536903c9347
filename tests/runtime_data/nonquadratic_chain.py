"""A chain of 2 to 4 levels z0 (top) -> z1 -> ... (or the tree top -> (z1 -> z3, z2)) with
non-quadratic couplings between every pair of levels that see each other, so that third derivatives (which the nested implicit engine differentiates through)
are not zero. Each level's objective is strongly convex in its own variable:

    f_k = 1/2 z_k^T A_k z_k - t_k^T z_k + 0.3 sum_{j != k} sum logcosh(z_k + W_kj tanh(z_j)),

A_k with eigenvalues in [1, 2]; the top level adds 0.05 sum z_0^4."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from bilevel.spec import BilevelSpec

DIMS = (2, 3, 3, 2)


@lru_cache(maxsize=32)
def _constants(k: int, depth: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1000 * seed + 10 * depth + k)
    d = DIMS[k]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return {
        "A": q @ torch.diag(torch.linspace(1.0, 2.0, d, dtype=torch.float64)) @ q.T,
        "t": torch.randn(d, generator=gen, dtype=torch.float64),
        "W": {j: torch.randn(d, DIMS[j], generator=gen, dtype=torch.float64) for j in range(depth) if j != k},
    }


def objective(upper: Any, lower: Any, batch: Any, k: int, depth: int, seed: int = 0) -> Tensor:
    z = {**dict(upper), **dict(lower)}
    own = z[f"z{k}"]
    c = _constants(k, depth, seed)
    value = 0.5 * own @ (c["A"] @ own) - c["t"] @ own
    for j, w in c["W"].items():
        if f"z{j}" in z:  # in a tree, a level sees its ancestors and its subtree, not its siblings'
            value = value + 0.3 * torch.log(torch.cosh(own + w @ torch.tanh(z[f"z{j}"]))).sum()
    if k == 0:
        value = value + 0.05 * (own**4).sum()
    return value


def chain_spec(depth: int = 3, steps: int = 40, lr: float = 0.5, warm_start: bool = True, seed: int = 0) -> BilevelSpec:
    levels: dict[str, Any] = {}
    for k in range(depth):
        level: dict[str, Any] = {
            "variables": {f"z{k}": {"shape": [DIMS[k]], "init": 0.1 * (k + 1)}},
            "objective": f"{__file__}:objective",
            "objective_kwargs": {"k": k, "depth": depth, "seed": seed},
        }
        if k == 0:
            level["solver"] = {"name": "sgd", "lr": 0.1}
        else:
            level["parent"] = f"level{k - 1}"
            level["solver"] = {"name": "sgd", "lr": lr, "steps": steps, "warm_start": warm_start}
            level["assumptions"] = {"convexity": "strongly_convex"}
        levels[f"level{k}"] = level
    return BilevelSpec.model_validate({"name": f"chain-{depth}", "levels": levels, "run": {"dtype": "float64", "device": "cpu"}})


def tree_spec(steps: int = 40, lr: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """The tree level0 -> (level1 -> level3, level2) with the same objectives (spec data)."""
    data = chain_spec(depth=4, steps=steps, lr=lr, seed=seed).model_dump(mode="json")
    data["levels"]["level2"]["parent"] = "level0"
    data["levels"]["level3"]["parent"] = "level1"
    data["name"] = "nonquadratic-tree"
    return data
