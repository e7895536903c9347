"""What an inner solve returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from bilevel.linalg.hvp import Linearization

__all__ = ["Minimized"]


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
    linearization: Linearization | None = None
    """The Linearization of G at the solution, where the solver built one
    there (an eager Newton-CG that stopped on its residual); None otherwise."""
