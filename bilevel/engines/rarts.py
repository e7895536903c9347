"""RARTS (Xue, Qi & Xin 2021, "RARTS: An Efficient First-Order Relaxed Architecture Search
Method", arXiv:2008.03901): network splitting and Gauss-Seidel steps on a relaxed single-level
objective; first order, no mixed second derivatives.

Reading of the paper (no official code; see docs/engines/darts.md): a second copy y of the
network weights is trained on the validation data and tied to the weights w by a proximity term,

    L(w, y, alpha) = L_val(y, alpha) + lam L_train(w, alpha) + beta/2 ||y - w||^2,

and each outer step takes one gradient step on L in each block, in order (Gauss-Seidel):

    w     <- w - eta_w (lam grad_w L_train(w, alpha) + beta (w - y))       (the lower solver's update rule)
    y     <- y - eta_y (grad_y L_val(y, alpha) + beta (y - w))             (w already updated)
    d     =  grad_alpha L_val(y, alpha) + lam grad_alpha L_train(w, alpha)  (returned; w, y updated)

and the outer optimizer moves alpha along d. The architecture thus learns from both data sets;
the validation signal reaches w only through y. A scheduled lower solver (``schedule`` with
``schedule_steps``, e.g. sharpDARTS's cosine power annealing) sets eta_w at each weight step, and
eta_y unless ``y_lr`` is given.

Analytic check (tests): with L_train = (w - alpha)^2 and L_val = alpha y - 2 alpha + 1 the
fixed point solves grad L = 0:

    alpha* = 2 / (2 - 1/beta - 1/(2 lam)),  w* = alpha* (1 - 1/(2 lam)),  y* = 2 - alpha*,

which tends to the bilevel optimum (1, 1) as lam, beta grow (bias O(1/beta + 1/lam)), whereas
first-order DARTS converges to (2, 2)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from bilevel.engines.base import Capabilities, EngineBase, EngineState, Hypergrad, Stats
from bilevel.engines.darts import grad_x, lower_steps, solver_at, warmup_steps, weight_steps_before
from bilevel.engines.registry import register
from bilevel.linalg.tree import tree_axpy, tree_norm, tree_scale, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import RartsConfig

__all__ = ["RartsEngine"]


@register
class RartsEngine(EngineBase):
    """Relaxed architecture search: two weight copies, Gauss-Seidel steps, first order."""

    kind: ClassVar[str] = "rarts"
    Config: ClassVar[type[RartsConfig]] = RartsConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="RARTS: weights on training data, a tied copy on validation data, Gauss-Seidel steps; first order",
        needs_hvp=False,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="constant",
        first_order=True,
        handles_architecture=True,
        returns_hypergradient=False,
    )

    def _y_optimizer(self, problem: Problem, weight_step: int = 0) -> InnerOptimizer:
        spec = problem.lower.solver
        lr = self.config.y_lr or solver_at(spec, weight_step).lr
        return InnerOptimizer(spec.model_copy(update={"lr": lr, "tuned": {}}))

    def init(self, problem: Problem, x: Params) -> EngineState:
        state = super().init(problem, x)
        y = problem.fresh(state.lower)
        state.extra["y"] = y
        state.extra["y_state"] = self._y_optimizer(problem).init(y)
        return state

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        start = time.perf_counter()
        lam, beta = self.config.lam, self.config.beta
        lower = problem.lower
        xd = tuple(p.detach() for p in x)
        w, w_state, y, y_state = state.lower, state.inner_state, state.extra["y"], state.extra["y_state"]
        configured_warmup = warmup_steps(self.config.warmup_steps, problem)
        warmup = configured_warmup if state.step == 0 else 0
        if warmup:
            w, w_state, _, _ = lower_steps(problem, InnerOptimizer(lower.solver), x, w, w_state, warmup)
            y = problem.fresh(w)
        weight_step = weight_steps_before(state.step, 1, configured_warmup) + warmup  # this call's w step (a scheduled solver)
        optimizer = InnerOptimizer(solver_at(lower.solver, weight_step))
        train_batch = lower.batch()

        # w: one step on lam L_train(w) + beta/2 ||w - y||^2
        g_train, _ = grad_x(lambda ww: problem.lower_objective(xd, ww, train_batch), w)
        direction = tree_axpy(beta, tree_sub(w, y), tree_scale(lam, g_train))
        w, w_state = optimizer.step(w, direction, w_state, problem.tuned_hyperparameters(xd, lower.solver.tuned))
        w = tuple(p.detach() for p in lower.project(w))

        # y: one step on L_val(y) + beta/2 ||y - w||^2, with w updated
        g_val, _ = grad_x(lambda yy: problem.upper_objective(xd, yy, batch), y)
        y, y_state = self._y_optimizer(problem, weight_step).step(y, tree_axpy(beta, tree_sub(y, w), g_val), y_state)
        y = tuple(p.detach() for p in lower.project(y))

        # alpha: grad_alpha L_val(y, alpha) + lam grad_alpha L_train(w, alpha), at the new (w, y)
        f_x, upper_loss = grad_x(lambda xx: problem.upper_objective(xx, y, batch), x)
        g_x, _ = grad_x(lambda xx: problem.lower_objective(xx, w, train_batch), x)
        d_x = tree_axpy(lam, g_x, f_x)

        stats = Stats(
            inner_residual=tree_norm(g_train).detach(),
            linear_residual=None,
            hvp_count=0,
            inner_steps=1 + warmup,
            time_s=time.perf_counter() - start,
            extra={"weight_gap": tree_norm(tree_sub(w, y)).detach()},
        )
        extra = {"y": y, "y_state": tuple(s.detach() for s in y_state)}
        new_state = EngineState(w, tuple(s.detach() for s in w_state), extra, state.step + 1)
        return Hypergrad(tuple(g.detach() for g in d_x), upper_loss, new_state, stats)
