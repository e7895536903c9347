"""A linear solver as a value: ``make_linear_solver(spec)`` returns solve(linearization, b, v0).

All engines that need H^{-1} b go through this one entry point (CG, Neumann or direct)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from bilevel.linalg.cg import cg
from bilevel.linalg.direct import direct
from bilevel.linalg.hvp import Linearization
from bilevel.linalg.neumann import neumann
from bilevel.linalg.result import SolveResult
from bilevel.linalg.tree import tree_axpy
from bilevel.spec.engine import LinearSolverSpec

__all__ = ["LinearSolver", "make_linear_solver"]

LinearSolver = Callable[[Linearization, Sequence[Tensor], "Sequence[Tensor] | None"], SolveResult]


def make_linear_solver(spec: LinearSolverSpec, inner_lr: float, instances: int | None = None) -> LinearSolver:
    """The configured solver of (H + ridge I) v = b; ``inner_lr`` is Neumann's default step.
    ``instances``: b stacks that many independent systems along its leading dimension (H is
    block diagonal); CG then runs one solve per instance. Neumann is elementwise-linear in b and
    needs nothing more; the direct solve does not support instances."""

    def matvec_of(lin: Linearization) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
        if spec.ridge == 0.0:
            return lin.hvp
        return lambda v: tree_axpy(spec.ridge, v, lin.hvp(v))

    if spec.method == "cg":

        def solve(lin: Linearization, b: Sequence[Tensor], v0: Sequence[Tensor] | None = None) -> SolveResult:
            return cg(matvec_of(lin), b, v0 if spec.warm_start else None, spec.maxiter, spec.tol, per_instance=bool(instances))

    elif spec.method == "neumann":
        lr = spec.neumann_lr if spec.neumann_lr is not None else inner_lr

        def solve(lin: Linearization, b: Sequence[Tensor], v0: Sequence[Tensor] | None = None) -> SolveResult:
            return neumann(matvec_of(lin), b, lr, spec.maxiter)

    else:

        def solve(lin: Linearization, b: Sequence[Tensor], v0: Sequence[Tensor] | None = None) -> SolveResult:
            if instances:
                raise ValueError("the direct solve does not support a batch of instances; use method: cg")
            n = sum(u.numel() for u in b)
            if n > spec.max_direct_size:
                raise ValueError(
                    f"direct solve on {n} lower-level scalars exceeds max_direct_size={spec.max_direct_size};"
                    " use method: cg"
                )
            return direct(lin.hvp_batched, b, spec.ridge)

    return solve
