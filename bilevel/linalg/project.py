"""Euclidean projection onto sets cut out by affine constraints on (x, y) jointly.

For c(w) = J w + c0 with w the concatenation of all tensors, the projection onto {c = 0} is
w - J^T (J J^T)^+ c(w). J is read off by one batched backward (c is affine, so J is its
gradient anywhere). Inequalities {c <= 0} are handled by projecting onto the currently violated
rows, repeated a few times: exact for one halfspace, an approximation (alternating projections)
for several."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.tree import tree_flatten, tree_unflatten

__all__ = ["project_affine", "project_simplex"]

Tree = tuple[Tensor, ...]


def _jacobian(fn: Callable[[Tree], Tensor], w: Tree) -> tuple[Tensor, Tensor]:
    leaves = tuple(p.detach().requires_grad_(True) for p in w)
    with torch.enable_grad():
        value = fn(leaves).reshape(-1)
        m = value.numel()
        eye = torch.eye(m, dtype=value.dtype, device=value.device)
        rows = torch.autograd.grad(value, leaves, eye, is_grads_batched=True, allow_unused=True)
    blocks = [torch.zeros(m, p.numel(), dtype=value.dtype, device=value.device) if r is None else r.reshape(m, -1) for r, p in zip(rows, leaves)]
    return value.detach(), torch.cat(blocks, dim=1)


def project_affine(
    fn: Callable[[Tree], Tensor], w: Sequence[Tensor], equality: bool, sweeps: int = 10
) -> Tree:
    """Project ``w`` onto {fn(w) == 0} (equality) or {fn(w) <= 0}; fn must be affine in w."""
    w = tuple(p.detach() for p in w)
    value, jac = _jacobian(fn, w)
    flat = tree_flatten(w)
    for _ in range(1 if equality else sweeps):
        residual = value if equality else torch.clamp(value, min=0)
        rows = jac if equality else jac * (value > 0).to(jac.dtype).unsqueeze(1)
        step = rows.T @ (torch.linalg.pinv(rows @ rows.T) @ residual)
        flat = flat - step
        value = value - jac @ step
    return tree_unflatten(flat, w)


def project_simplex(v: Tensor, radius: float = 1.0) -> Tensor:
    """Euclidean projection of all entries of v onto {u >= 0, sum u = radius} (sort-based, exact;
    Duchi, Shalev-Shwartz, Singer & Chandra 2008). No host synchronization."""
    flat = v.reshape(-1)
    sorted_desc, _ = torch.sort(flat, descending=True)
    cumulative = torch.cumsum(sorted_desc, 0) - radius
    index = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    active = sorted_desc - cumulative / index > 0
    rho = torch.sum(active) - 1  # last index where the condition holds (it holds for a prefix)
    theta = cumulative.gather(0, rho.reshape(1)) / (rho + 1).to(flat.dtype)
    return torch.clamp(flat - theta, min=0).reshape(v.shape)
