"""What an inner solve returns, and the flat view of a tuple of tensors the solvers work on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Minimized", "flatten", "unflatten"]


@dataclass(frozen=True)
class Minimized:
    """The solution of one solve and what a user needs to trust it; tensors stay on the device."""

    solution: tuple[Tensor, ...]
    grad: tuple[Tensor, ...]
    """grad G at the solution (what the residual is the norm of)."""
    value: Tensor
    """G at the solution."""
    residual: Tensor
    """||grad G|| at the solution."""
    steps: Tensor
    """Iterations taken before the residual stop held (all of them without a tolerance), 0-d long."""
    converged: Tensor
    """Whether the residual stop held (False without a tolerance), 0-d bool."""
    evaluations: int
    """Gradient evaluations run (frozen iterations included), counted on the host."""
    products: int = 0
    """Hessian-vector products run (Newton-CG), counted on the host."""


def flatten(tree: Sequence[Tensor]) -> Tensor:
    """The tensors of ``tree`` as one vector."""
    return torch.cat([t.reshape(-1) for t in tree])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``flat`` cut into tensors of the shapes of ``like``."""
    parts = torch.split(flat, [t.numel() for t in like])
    return tuple(p.reshape(t.shape) for p, t in zip(parts, like))
