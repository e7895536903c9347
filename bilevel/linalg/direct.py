"""Direct solve for small lower levels: H is assembled from one batched HVP over the basis
(n products in a single vectorized backward) and factorized."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.result import SolveResult
from bilevel.linalg.tree import tree_flatten, tree_unflatten

__all__ = ["direct"]


def direct(
    hvp_batched: Callable[[Tensor], Tensor],
    b: Sequence[Tensor],
    ridge: float = 0.0,
    symmetric: bool = True,
) -> SolveResult:
    """Solve (H + ridge I) v = b exactly; ``hvp_batched`` maps (k, n) vectors to their products
    (as rows). ``symmetric``: H is symmetric and its assembly is symmetrized; False: a general
    square operator A (a fixed point's adjoint system), assembled as the transpose of its rows."""
    b = tuple(b)
    flat_b = tree_flatten(b)
    n = flat_b.numel()
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
    hessian = hvp_batched(eye)
    hessian = (0.5 * (hessian + hessian.T) if symmetric else hessian.T) + ridge * eye
    flat_v = torch.linalg.solve(hessian, flat_b)
    residual = torch.linalg.vector_norm(hessian @ flat_v - flat_b) / torch.clamp(
        torch.linalg.vector_norm(flat_b), min=torch.finfo(flat_b.dtype).tiny
    )
    return SolveResult(tree_unflatten(flat_v, b), residual, n)
