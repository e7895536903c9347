"""Quadratic blocks under one upper level, with closed forms: the oracle of a level of blocks.

x in R^p is shared; block i (of m) has y_i in R^n and its own matrices (seeded by the block's
index, ``blocks.vary: {levels.<level>.data.kwargs.block: index}``):

    g_i(x, y_i) = 1/2 y_i^T A_i y_i - y_i^T B_i x,        y_i*(x) = M_i x,  M_i = A_i^{-1} B_i,
    f_i(x, y_i) = 1/2 ||y_i - c_i||^2 + rho/2 ||x||^2,
    F(x)        = (1/m) sum_i f_i(x, y_i*(x)),
    dF/dx       = rho x + (1/m) sum_i M_i^T (M_i x - c_i),
    x*          = (rho I + (1/m) sum_i M_i^T M_i)^{-1} (1/m) sum_i M_i^T c_i.

A_i has eigenvalues in [1, 2], so each block is strongly convex with condition number 2."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from problems.toy.three_level import _spd

__all__ = ["block_data", "block_lower", "block_upper", "blocks_closed_form", "blocks_spec"]


@lru_cache(maxsize=512)
def _arrays(block: int, p: int, n: int, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed * 100_003 + block)
    return {
        "A": _spd(n, 1.0, 2.0, gen).unsqueeze(0),
        "B": (torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5).unsqueeze(0),
        "c": torch.randn(n, generator=gen, dtype=torch.float64).unsqueeze(0),
    }


def block_data(block: int = 0, p: int = 3, n: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """Block ``block``'s matrices, each with a leading dimension of 1 (one "example")."""
    return dict(_arrays(int(block), p, n, seed))


def block_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """g_i."""
    y, x = lower["y"], upper["x"]
    return 0.5 * y @ (batch["A"][0] @ y) - y @ (batch["B"][0] @ x)


def block_upper(upper: Any, lower: Any, batch: dict[str, Tensor], rho: float = 0.1) -> Tensor:
    """f_i."""
    x, y = upper["x"], lower["y"]
    return 0.5 * ((y - batch["c"][0]) ** 2).sum() + 0.5 * rho * (x**2).sum()


def blocks_closed_form(x: Tensor, m: int, p: int = 3, n: int = 4, seed: int = 0, rho: float = 0.1) -> dict[str, Tensor]:
    """Y*(x) (m x n), F(x), dF/dx and the minimizer x* of F."""
    maps = [torch.linalg.solve(_arrays(i, p, n, seed)["A"][0], _arrays(i, p, n, seed)["B"][0]) for i in range(m)]
    targets = [_arrays(i, p, n, seed)["c"][0] for i in range(m)]
    y = torch.stack([M @ x for M in maps])
    value = sum(0.5 * ((yi - c) ** 2).sum() for yi, c in zip(y, targets)) / m + 0.5 * rho * (x**2).sum()
    grad = rho * x + sum(M.T @ (M @ x - c) for M, c in zip(maps, targets)) / m
    system = rho * torch.eye(p, dtype=torch.float64) + sum(M.T @ M for M in maps) / m
    best = torch.linalg.solve(system, sum(M.T @ c for M, c in zip(maps, targets)) / m)
    return {"y": y, "value": value, "hypergrad": grad, "x_star": best}


def blocks_spec(count: int = 6, sample: int | None = None, p: int = 3, n: int = 4, seed: int = 0,
                engine: dict[str, Any] | None = None, steps: int = 3, inner_steps: int = 60, lr: float = 0.2,
                lower_lr: float = 0.6, order: str = "shuffled") -> dict[str, Any]:
    """The quadratic blocks as spec data (float64)."""
    data = {"source": "problems.toy.blocks:block_data", "kwargs": {"p": p, "n": n, "seed": seed}}
    blocks: dict[str, Any] = {"count": count, "vary": {"levels.block.data.kwargs.block": "index",
                                                       "levels.shared.data.kwargs.block": "index"}, "order": order}
    if sample is not None:
        blocks["sample"] = sample
    return {
        "name": "toy-blocks",
        "levels": {
            "shared": {"variables": {"x": {"shape": [p], "init": "normal"}}, "objective": "problems.toy.blocks:block_upper",
                       "data": data, "solver": {"name": "sgd", "lr": lr}},
            "block": {"parent": "shared", "variables": {"y": {"shape": [n]}}, "objective": "problems.toy.blocks:block_lower",
                      "data": data, "solver": {"name": "sgd", "lr": lower_lr, "steps": inner_steps},
                      "assumptions": {"convexity": "strongly_convex"}, "blocks": blocks},
        },
        "engine": engine or {"kind": "auto"},
        "run": {"device": "cpu", "dtype": "float64", "seed": seed, "steps": steps, "checkpoint_every": None},
    }
