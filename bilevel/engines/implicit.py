"""Implicit differentiation (IFT) of the lower solution.

If y*(x) solves grad_y G(x, y) = 0 and H = grad^2_yy G(x, y*) is invertible, then
dy*/dx = -H^{-1} grad^2_yx G, so the hypergradient of F(x, y*(x)) is

    dF/dx = grad_x F - (grad^2_xy G)^T v,    H v = grad_y F.

Algorithm (Pedregosa 2016, "Hyperparameter optimization with approximate gradient";
Rajeswaran et al. 2019, iMAML; Lorraine et al. 2020): solve the lower level with the inner
optimizer (warm-started), solve H v = grad_y F by CG / Neumann / direct on Hessian-vector
products (never forming H except in the direct solve of small problems), then one mixed VJP.
The result is exact when the inner problem and the linear solve converge; it is biased when the
inner solve stops early (report the inner residual).

Execution (one CUDA graph, a compiled inner loop, TF32/bf16 for the inner solve and the HVPs)
is the fast path's business (``bilevel.fastpath``); this module is the algorithm."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from bilevel.engines.base import Capabilities, EngineState, Hypergrad, Stats
from bilevel.engines.inner import lower_start
from bilevel.engines.registry import register
from bilevel.fastpath.engine import FastPathEngine
from bilevel.linalg.hvp import Linearization, joint_grad
from bilevel.linalg.solve import make_linear_solver
from bilevel.linalg.tree import tree_norm, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import ImplicitConfig

__all__ = ["ImplicitEngine"]


@register
class ImplicitEngine(FastPathEngine):
    """IFT hypergradients with a linear solver passed in as a value."""

    kind: ClassVar[str] = "implicit"
    Config: ClassVar[type[ImplicitConfig]] = ImplicitConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="implicit function theorem: H v = grad_y F solved by CG/Neumann/direct on HVPs",
        needs_hvp=True,
        lower_convexity=("strongly_convex",),
        memory="constant",
        exact_when_converged=True,
        handles_instances=True,
    )

    def compute(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        start = time.perf_counter()
        lower = problem.lower
        solver_spec = lower.solver
        optimizer = InnerOptimizer(solver_spec)
        fast = self.fast
        y0 = lower_start(problem, state)
        with fast.reduced_precision(problem):
            y, _ = fast.solve_lower(problem, optimizer, x, y0, optimizer.init(y0), solver_spec.steps)

        lower_batch = lower.batch()
        with fast.reduced_precision(problem):
            lin = Linearization(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y, self.config.hvp)
        grad_x, grad_y, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        solve = make_linear_solver(self.config.linear_solver, solver_spec.lr, problem.instances)
        with fast.reduced_precision(problem):
            result = solve(lin, grad_y, state.extra.get("v"))
            grad = tree_sub(grad_x, lin.vjp_x(result.solution))

        stats = Stats(
            inner_residual=tree_norm(lin.grad_y).detach(),
            # with a batch of instances, the worst instance's residual
            linear_residual=result.residual.detach().amax(),
            hvp_count=result.matvecs,
            inner_steps=solver_spec.steps,
            time_s=time.perf_counter() - start,
        )
        new_state = EngineState(
            tuple(p.detach() for p in y), state.inner_state, {"v": tuple(v.detach() for v in result.solution)}, state.step + 1
        )
        return Hypergrad(tuple(g.detach() for g in grad), upper_loss.detach(), new_state, stats)
