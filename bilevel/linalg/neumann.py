"""Truncated Neumann series for H^{-1} b (Lorraine et al. 2020, "Optimizing Millions of
Hyperparameters by Implicit Differentiation"):

    H^{-1} b ~= eta * sum_{j=0}^{K} (I - eta H)^j b,

which converges when 0 < eta < 2 / L (L the largest eigenvalue of H)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.result import SolveResult
from bilevel.linalg.tree import tree_add, tree_axpy, tree_dot, tree_scale, tree_sub

__all__ = ["neumann"]

Tree = tuple[Tensor, ...]


def neumann(
    matvec: Callable[[Tree], Tree],
    b: Sequence[Tensor],
    lr: float,
    maxiter: int = 20,
) -> SolveResult:
    """Approximate H^{-1} b with ``maxiter`` terms beyond the first; the residual costs one more product."""
    b = tuple(b)
    term = b
    total = b
    for _ in range(maxiter):
        term = tree_axpy(-lr, matvec(term), term)
        total = tree_add(total, term)
    solution = tree_scale(lr, total)
    residual_vec = tree_sub(matvec(solution), b)
    bnorm = torch.sqrt(tree_dot(b, b))
    residual = torch.sqrt(tree_dot(residual_vec, residual_vec)) / torch.clamp(bnorm, min=torch.finfo(bnorm.dtype).tiny)
    return SolveResult(solution, residual, maxiter + 1)
