"""The implicit engine on a lower level with sets or proximal terms: its solution is the fixed
point y = T(x, y) = P(x, y - eta grad_y G) of the projected / proximal gradient step, not a zero
of grad_y G, so the implicit function theorem is applied to that fixed point (Blondel et al.
2022, "Efficient and Modular Implicit Differentiation"; ``bilevel.linalg.fixed_point``):

    dF/dx = grad_x F + (d_xT)^T w,    (I - d_yT)^T w = grad_y F."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from bilevel.engines.inner import fixed_point_map
from bilevel.linalg.fixed_point import FixedPointLinearization
from bilevel.linalg.hvp import Linearization
from bilevel.linalg.result import SolveResult
from bilevel.linalg.solve import make_fixed_point_solver
from bilevel.linalg.tree import tree_add
from bilevel.problem import Params, Problem
from bilevel.spec.engine import LinearSolverSpec

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["fixed_point_hypergrad", "fixed_point_reasons"]


def fixed_point_reasons(facts: ProblemFacts) -> list[str]:
    """Why a lower level with sets or proximal terms is differentiated as a fixed point."""
    declared = [*facts.lower_sets, *facts.prox_operators]
    if not declared or facts.depth > 2:
        return []
    return [f"{', '.join(declared)}: the lower solution is the fixed point y = P(y - eta grad_y G) of the projected /"
            " proximal gradient step, not a zero of grad_y G; the implicit engine differentiates that fixed point"
            " ((I - d_yT)^T w = grad_y F, active-set aware: entries held at a bound or at zero do not move)"]


def fixed_point_hypergrad(
    problem: Problem, spec: LinearSolverSpec, lin: Linearization, grad_x: Params, grad_y: Params, v0: Params | None
) -> tuple[Params, SolveResult, Tensor]:
    """dF/dx = grad_x F + (d_xT)^T w with (I - d_yT)^T w = grad_y F, for the fixed-point map
    T(x, y) = P(x, y - eta grad_y G) of a lower level with sets or proximal terms
    (``bilevel.linalg.fixed_point``); also the solve's result and the fixed-point residual.
    eta: the Neumann step when one is set (the series needs eta < 2/L), else the inner lr; the
    derivative of the fixed point does not depend on it."""
    eta = spec.neumann_lr if spec.method == "neumann" and spec.neumann_lr is not None else problem.lower.solver.lr
    fp = FixedPointLinearization(lin, lambda xx, zz: fixed_point_map(problem, xx, zz, eta), eta, spec.ridge)
    result = make_fixed_point_solver(spec, problem.instances)(fp, grad_y, v0)
    return tree_add(grad_x, fp.vjp_x(result.solution)), result, fp.residual
