"""Quadratic trees of levels with closed-form hypergradients: the oracle of trees.

**Star** (one upper level, children of different sizes): x in R^p; child i has y_i in R^{n_i},

    G_i(x, y_i) = 1/2 y_i^T A_i y_i - y_i^T B_i x,         y_i*(x) = A_i^{-1} B_i x,
    F(x, y)     = sum_i 1/2 ||y_i - c_i||^2 + rho/2 ||x||^2,
    dF/dx       = rho x + sum_i (A_i^{-1} B_i)^T (y_i*(x) - c_i),

the sum of the children's contributions.

**Depth 3**: the three-level quadratic of problems/toy/three_level.py (a -> b -> c) with a fourth
level "side" under the top, a child like the star's: F gains 1/2 ||y_s - c_s||^2 and dF/da gains
(A_s^{-1} B_s)^T (y_s*(a) - c_s). Children are solved given their ancestors only: the side level
does not see b or c, and b's objective does not see the side level.

The objectives read their own parts of one data mapping (float64)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from problems.toy.three_level import _spd, three_level_closed_form
from problems.toy.three_level import top_objective as chain_top_objective

__all__ = ["child_objective", "side_top_objective", "star_closed_form", "star_data", "star_spec", "star_top_objective",
           "tree_closed_form", "tree_spec"]

SIZES = (3, 4, 5)


@lru_cache(maxsize=8)
def _arrays(p: int, sizes: tuple[int, ...], seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for i, n in enumerate(sizes):
        out[f"A{i}"] = _spd(n, 1.0, 2.0, gen).unsqueeze(0)
        out[f"B{i}"] = (torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5).unsqueeze(0)
        out[f"c{i}"] = torch.randn(n, generator=gen, dtype=torch.float64).unsqueeze(0)
    return out


def star_data(p: int = 2, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> dict[str, Tensor]:
    """Every child's matrices, each with a leading dimension of 1 (one "example")."""
    return dict(_arrays(p, tuple(sizes), seed))


def child_objective(upper: Any, lower: Any, batch: dict[str, Tensor], index: int = 0, variable: str = "y0",
                    upper_variable: str = "x") -> Tensor:
    """G_i: ``upper`` holds the child's ancestors (x), ``lower`` the child (and nothing of its siblings)."""
    y, x = lower[variable], upper[upper_variable]
    A, B = batch[f"A{index}"][0], batch[f"B{index}"][0]
    return 0.5 * y @ (A @ y) - y @ (B @ x)


def star_top_objective(upper: Any, lower: Any, batch: dict[str, Tensor], rho: float = 0.1, children: int = 3) -> Tensor:
    """F: ``lower`` holds every child."""
    x = upper["x"]
    return sum(0.5 * ((lower[f"y{i}"] - batch[f"c{i}"][0]) ** 2).sum() for i in range(children)) + 0.5 * rho * (x**2).sum()


def star_closed_form(x: Tensor, p: int = 2, sizes: tuple[int, ...] = SIZES, seed: int = 0, rho: float = 0.1) -> dict[str, Tensor]:
    """y_i*(x) and dF/dx of the star."""
    data = star_data(p, sizes, seed)
    grad = rho * x
    out: dict[str, Tensor] = {}
    for i in range(len(sizes)):
        M = torch.linalg.solve(data[f"A{i}"][0], data[f"B{i}"][0])
        out[f"y{i}"] = M @ x
        grad = grad + M.T @ (out[f"y{i}"] - data[f"c{i}"][0])
    out["hypergrad"] = grad
    return out


def star_spec(p: int = 2, sizes: tuple[int, ...] = SIZES, seed: int = 0, steps: tuple[int, ...] = (40, 60, 80),
              lr: float = 0.6, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The star as spec data: each child with its own size, inner steps and data arguments."""
    data = {"source": "problems.toy.tree:star_data", "kwargs": {"p": p, "sizes": list(sizes), "seed": seed}}
    levels: dict[str, Any] = {"top": {"variables": {"x": {"shape": [p], "init": "normal"}},
                                      "objective": "problems.toy.tree:star_top_objective",
                                      "objective_kwargs": {"children": len(sizes)}, "data": data,
                                      "solver": {"name": "sgd", "lr": 0.3}}}
    for i, n in enumerate(sizes):
        levels[f"child{i}"] = {"parent": "top", "variables": {f"y{i}": {"shape": [n]}}, "objective": "problems.toy.tree:child_objective",
                               "objective_kwargs": {"index": i, "variable": f"y{i}"}, "data": data,
                               "solver": {"name": "sgd", "lr": lr, "steps": steps[i], "warm_start": False},
                               "assumptions": {"convexity": "strongly_convex"}}
    return {"name": "toy-star", "levels": levels, "engine": engine or {"kind": "auto"},
            "run": {"device": "cpu", "dtype": "float64", "seed": seed, "steps": 3, "checkpoint_every": None}}


def _side(batch_source: dict[str, Any]) -> dict[str, Any]:
    return {"parent": "top", "variables": {"s": {"shape": [SIZES[0]]}}, "objective": "problems.toy.tree:child_objective",
            "objective_kwargs": {"index": 0, "variable": "s", "upper_variable": "a"}, "data": batch_source,
            "solver": {"name": "sgd", "lr": 0.6, "steps": 40, "warm_start": False}, "assumptions": {"convexity": "strongly_convex"}}


def tree_spec(seed: int = 0, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The depth-3 tree (top -> (middle -> bottom, side)) as spec data."""
    from problems.toy.three_level import three_level_spec

    data = three_level_spec(seed=seed).model_dump(mode="json")
    side_data = {"source": "problems.toy.tree:star_data", "kwargs": {"p": 2, "sizes": [SIZES[0]], "seed": seed + 1}}
    data["levels"]["side"] = _side(side_data)
    data["levels"]["top"]["objective"] = "problems.toy.tree:side_top_objective"
    data["levels"]["top"]["objective_kwargs"] = {"rho": 0.1, "seed": seed + 1}
    data["name"] = "toy-tree"
    data["engine"] = engine or {"kind": "auto"}
    return data


def side_top_objective(upper: Any, lower: Any, batch: dict[str, Tensor], rho: float = 0.1, seed: int = 1) -> Tensor:
    """F of the depth-3 tree: the top level's batch is the three-level top's; the side child's
    target comes from its own data arguments (``seed``)."""
    target = star_data(2, (SIZES[0],), seed)["c0"][0]
    return chain_top_objective(upper, lower, batch, rho) + 0.5 * ((lower["s"] - target) ** 2).sum()


def tree_closed_form(a: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """b*, c*, the side child's solution and dF/da of the depth-3 tree."""
    chain = three_level_closed_form(a, seed=seed)
    side = star_closed_form(a, 2, (SIZES[0],), seed + 1, rho=0.0)
    return {"b": chain["b"], "c": chain["c"], "s": side["y0"], "hypergrad": chain["hypergrad"] + side["hypergrad"]}
