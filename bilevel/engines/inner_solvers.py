"""The lower level's solve by L-BFGS or Newton-CG: a Problem adapted to ``bilevel.minimize``.

Both minimize G(x, .) at fixed upper variables x on one batch of the lower data (the whole data
set: the planner refuses them on minibatched lower data, whose objective changes from step to
step), and only their solution is used: engines that differentiate the optimizer's steps are
refused them. The kernels (Nocedal & Wright 2006, Algorithms 7.5 and 7.1) reuse the one gradient
and Hessian-vector product of ``bilevel.linalg.hvp`` and the one CG of ``bilevel.linalg.cg``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.distributed.reduce import sum_over_ranks
from bilevel.linalg.hvp import Linearization, grad_and_value
from bilevel.minimize import lbfgs, newton_cg
from bilevel.problem import Params, Problem
from bilevel.spec.optimizer import OptimizerSpec

__all__ = ["LowerSolve", "minimize_lower"]


@dataclass(frozen=True)
class LowerSolve:
    """One lower solve: the solution, the optimizer state after it, the last gradient evaluated,
    and, on the device, the steps taken before the residual stop held (all of them without one)."""

    solution: Params
    state: Params
    grad: Params | None
    steps: Tensor | int
    residual: Tensor | None = None
    """||grad_y G|| at the solution, where the solver evaluated it (L-BFGS, Newton-CG)."""
    linearization: Linearization | None = None
    """G's Linearization at the solution on the lower batch, where the solver built one there (an
    eager Newton-CG stopped on its residual): the implicit engine's linear system reuses it."""


def minimize_lower(problem: Problem, spec: OptimizerSpec, x: Params, y: Params, steps: int, batch: Any) -> LowerSolve:
    """``steps`` iterations of spec's L-BFGS or Newton-CG on G(x, .) from y, on ``batch``, stopped
    at spec.tol when it is set (one host read every spec.check_every iterations; 0: none)."""
    xs = tuple(p.detach() for p in x)

    def objective(yy: Params) -> Tensor:
        return problem.lower_objective(xs, yy, batch)

    def value_and_grad(yy: Params) -> tuple[Tensor, Params]:
        leaves = tuple(p.detach().requires_grad_(True) for p in yy)
        grads, value = grad_and_value(objective, leaves)  # both summed over ranks
        return value.detach(), tuple(g.detach() for g in grads)

    def value(yy: Params) -> Tensor:
        with torch.no_grad():
            return sum_over_ranks((objective(yy),))[0]

    def linearize(yy: Params) -> Linearization:
        return Linearization(lambda xx, zz: problem.lower_objective(xx, zz, batch), xs, yy)

    common = dict(tol=spec.tol, c1=spec.sufficient_decrease, backtrack=spec.backtrack,
                  check_every=spec.check_every, sync=spec.check_every > 0)
    with torch.enable_grad():
        if spec.name == "lbfgs":
            out = lbfgs(value_and_grad, y, steps, spec.lr, history=spec.history, **common)
        elif spec.name == "newton_cg":
            out = newton_cg(value_and_grad, value, linearize, y, steps, cg_maxiter=spec.cg_maxiter,
                            trials=spec.line_search_trials, **common)
        else:
            raise ValueError(f"{spec.name} is a first-order optimizer (bilevel.optim), not a minimizer")
    return LowerSolve(tuple(p.detach() for p in out.solution), (), out.grad, out.steps, out.residual, out.linearization)
