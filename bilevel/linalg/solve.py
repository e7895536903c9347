"""A linear solver as a value: ``make_linear_solver(spec)`` returns solve(linearization, b, v0).

All engines that need H^{-1} b go through this one entry point (CG, Neumann or direct)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.cg import cg
from bilevel.linalg.direct import direct
from bilevel.linalg.fixed_point import FixedPointLinearization
from bilevel.linalg.hvp import Linearization
from bilevel.linalg.neumann import neumann
from bilevel.linalg.result import SolveResult
from bilevel.linalg.tree import instance_dot, tree_axpy, tree_dot, tree_sub
from bilevel.spec.engine import LinearSolverSpec

__all__ = ["FixedPointSolver", "LinearSolver", "make_fixed_point_solver", "make_linear_solver"]

LinearSolver = Callable[[Linearization, Sequence[Tensor], "Sequence[Tensor] | None"], SolveResult]
FixedPointSolver = Callable[[FixedPointLinearization, Sequence[Tensor], "Sequence[Tensor] | None"], SolveResult]


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


def make_fixed_point_solver(spec: LinearSolverSpec, instances: int | None = None) -> FixedPointSolver:
    """The configured solver of a fixed point's adjoint system A w = b, A = (I - d_yT)^T
    (``bilevel.linalg.fixed_point``; the ridge is part of T), by the same three methods:

    * cg: CG on the normal equations A^T A w = A^T b (CGNR; JAXopt's solve_normal_cg), two
      products per iteration, ``maxiter`` iterations (plus one product for the residual);
    * neumann: w = sum_{j <= maxiter} (d_yT^T)^j b, the Neumann series of A = I - d_yT^T (the
      shared series with step 1), which converges when T is a contraction (eta < 2/L);
    * direct: A assembled from batched products and solved by LU (small lower levels).

    The residual is ||A w - b|| / ||b|| of the system itself."""

    def relative(fp: FixedPointLinearization, w: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
        r = tree_sub(fp.matvec(w), b)
        dot = (lambda u, v: instance_dot(u, v)) if instances else tree_dot
        return torch.sqrt(dot(r, r)) / torch.clamp(torch.sqrt(dot(b, b)), min=torch.finfo(b[0].dtype).tiny)

    if spec.method == "cg":

        def solve(fp: FixedPointLinearization, b: Sequence[Tensor], v0: Sequence[Tensor] | None = None) -> SolveResult:
            b = tuple(b)
            result = cg(lambda u: fp.rmatvec(fp.matvec(u)), fp.rmatvec(b), v0 if spec.warm_start else None, spec.maxiter,
                        spec.tol, per_instance=bool(instances))
            return SolveResult(result.solution, relative(fp, result.solution, b), 2 * result.matvecs + 2)

    elif spec.method == "neumann":

        def solve(fp: FixedPointLinearization, b: Sequence[Tensor], v0: Sequence[Tensor] | None = None) -> SolveResult:
            return neumann(fp.matvec, b, 1.0, spec.maxiter)

    else:

        def solve(fp: FixedPointLinearization, b: Sequence[Tensor], v0: Sequence[Tensor] | None = None) -> SolveResult:
            if instances:
                raise ValueError("the direct solve does not support a batch of instances; use method: cg")
            n = sum(u.numel() for u in b)
            if n > spec.max_direct_size:
                raise ValueError(f"direct solve on {n} lower-level scalars exceeds max_direct_size={spec.max_direct_size};"
                                 " use method: cg")
            return direct(fp.matvec_batched, b, 0.0, symmetric=False)

    return solve
