"""Arithmetic on tuples of tensors (the flat variables of a level), fused with torch._foreach ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "instance_axpy",
    "instance_dot",
    "instance_flatten",
    "instance_unflatten",
    "tree_add",
    "tree_axpy",
    "tree_dot",
    "tree_flatten",
    "tree_norm",
    "tree_scale",
    "tree_sub",
    "tree_unflatten",
    "tree_zeros_like",
    "zeros_for_none",
]

Tree = Sequence[Tensor]


def tree_dot(a: Tree, b: Tree) -> Tensor:
    """sum_i <a_i, b_i> as a 0-d tensor (stays on the device)."""
    out = torch.vdot(a[0].reshape(-1), b[0].reshape(-1))
    for u, v in zip(a[1:], b[1:]):
        out = out + torch.vdot(u.reshape(-1), v.reshape(-1))
    return out


def tree_norm(a: Tree) -> Tensor:
    """Euclidean norm of the concatenation of a's tensors, as a 0-d tensor."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u) for u in a]))


def tree_axpy(alpha: Tensor | float, x: Tree, y: Tree) -> tuple[Tensor, ...]:
    """y + alpha * x."""
    if isinstance(alpha, Tensor):  # per tensor, one fused op each (the backward of _foreach_mul(list, Tensor) fails, torch 2.13)
        return tuple(torch.addcmul(v, u, alpha) for u, v in zip(x, y))
    return tuple(torch._foreach_add(list(y), list(x), alpha=alpha))


def tree_add(a: Tree, b: Tree) -> tuple[Tensor, ...]:
    return tuple(torch._foreach_add(list(a), list(b)))


def tree_sub(a: Tree, b: Tree) -> tuple[Tensor, ...]:
    return tuple(torch._foreach_sub(list(a), list(b)))


def tree_scale(alpha: Tensor | float, a: Tree) -> tuple[Tensor, ...]:
    if isinstance(alpha, Tensor):
        return tuple(u * alpha for u in a)
    return tuple(torch._foreach_mul(list(a), alpha))


def tree_flatten(a: Tree) -> Tensor:
    """The tensors of ``a`` as one vector (one copy)."""
    return torch.cat([u.reshape(-1) for u in a])


def tree_unflatten(flat: Tensor, like: Tree) -> tuple[Tensor, ...]:
    """``flat`` cut into tensors of the shapes of ``like`` (views of it, no copy)."""
    parts = torch.split(flat, [u.numel() for u in like])
    return tuple(part.reshape(u.shape) for part, u in zip(parts, like))


def tree_zeros_like(a: Tree) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(u) for u in a)


def zeros_for_none(grads: Sequence[Tensor | None], like: Tree) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(..., allow_unused=True)``'s result with zeros (shaped like ``like``)
    for the inputs it did not reach."""
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, like))


# --- batches of independent instances: the leading dimension of every tensor is the instance ---
def instance_dot(a: Tree, b: Tree) -> Tensor:
    """Per-instance sum_i <a_i[k], b_i[k]> for each k along the leading dimension, shape (N,)."""
    out = (a[0] * b[0]).reshape(a[0].shape[0], -1).sum(1)
    for u, v in zip(a[1:], b[1:]):
        out = out + (u * v).reshape(u.shape[0], -1).sum(1)
    return out


def instance_axpy(alpha: Tensor, x: Tree, y: Tree) -> tuple[Tensor, ...]:
    """y + alpha[k] * x for each instance k (alpha of shape (N,))."""
    return tuple(torch.addcmul(v, u, alpha.reshape(-1, *([1] * (u.dim() - 1)))) for u, v in zip(x, y))


def instance_flatten(a: Tree) -> Tensor:
    """The tensors of ``a`` as one (N, D) matrix, instance k's scalars in row k (one copy)."""
    return torch.cat([u.reshape(u.shape[0], -1) for u in a], dim=1)


def instance_unflatten(flat: Tensor, like: Tree) -> tuple[Tensor, ...]:
    """``flat`` (N, D) cut into tensors of the shapes of ``like`` (views of it, no copy)."""
    parts = torch.split(flat, [u[0].numel() for u in like], dim=1)
    return tuple(part.reshape(u.shape) for part, u in zip(parts, like))
