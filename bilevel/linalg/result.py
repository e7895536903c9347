"""What a linear solve returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["SolveResult"]


@dataclass(frozen=True)
class SolveResult:
    """Solution v of H v = b, with ||H v - b|| / ||b|| as a device tensor (read it when you log,
    not inside a loop) and the number of Hessian-vector products spent."""

    solution: tuple[Tensor, ...]
    residual: Tensor
    matvecs: int
