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

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.architecture import architecture_memory_mb, architecture_reason, grad_x, lower_steps, memory_estimate
from bilevel.engines.architecture import solver_at, warmup_steps, weight_steps_before
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.tree import tree_axpy, tree_norm, tree_scale, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["RartsConfig", "RartsEngine", "RartsState"]


class RartsConfig(EngineConfig):
    """RARTS (Xue, Qi & Xin 2021, "RARTS: An Efficient First-Order Relaxed Architecture Search
    Method"): network splitting with a second copy y of the weights, trained on validation data,
    and Gauss-Seidel steps on the relaxed single-level objective

        L(w, y, alpha) = L_val(y, alpha) + lam L_train(w, alpha) + beta/2 ||y - w||^2

    (w, then y, then alpha); first order, no mixed second derivatives."""

    kind: Literal["rarts"] = "rarts"
    """Discriminator: the RARTS engine."""
    lam: Annotated[float, Field(gt=0)] = 1.0
    """lambda: weight of the training loss."""
    beta: Annotated[float, Field(gt=0)] = 10.0
    """beta: coupling of the two weight copies. The fixed point is biased by about
    (1/beta + 1/(2 lam)) / 2 on the analytic toy, so a coupling well above 1 is needed (the step
    sizes must stay below about 1 / (lam + beta))."""
    y_lr: Annotated[float, Field(gt=0)] | None = None
    """Step size of y (same optimizer kind as the lower solver); None: the lower solver's lr."""
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    """Steps of the lower solver on L_train alone before the first architecture step (in the first
    outer step); y then starts as a copy of the warmed-up w. None: the architecture variable's
    warmup_steps (0 without one)."""


@dataclass
class RartsState(EngineState):
    """The weights w (lower), and their tied copy y trained on validation data with its optimizer state."""

    y: Params | None = None
    y_state: Params | None = None


@register
class RartsEngine(EngineBase):
    """Relaxed architecture search: two weight copies, Gauss-Seidel steps, first order."""

    kind: ClassVar[str] = "rarts"
    Config: ClassVar[type[RartsConfig]] = RartsConfig
    State: ClassVar[type[RartsState]] = RartsState
    priority: ClassVar[int] = 35
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

    def init(self, problem: Problem, x: Params) -> RartsState:
        start = super().init(problem, x)
        y = problem.fresh(start.lower)
        return dataclasses.replace(start, y=y, y_state=self._y_optimizer(problem).init(y))

    def compute(self, problem: Problem, x: Params, state: RartsState, batch: Any) -> Hypergrad:
        lam, beta = self.config.lam, self.config.beta
        lower = problem.lower
        xd = tuple(p.detach() for p in x)
        w, w_state, y, y_state = state.lower, state.inner_state, state.y, state.y_state
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
            extra={"weight_gap": tree_norm(tree_sub(w, y)).detach()},
        )
        new_state = RartsState(w, tuple(s.detach() for s in w_state), state.step + 1, y=y, y_state=tuple(s.detach() for s in y_state))
        return Hypergrad(d_x, upper_loss, new_state, stats)

    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        """Architecture search whose weights step with a solver DARTS's virtual step is not defined
        for (adam), when RARTS fits the budget; else decline (DARTS takes it)."""
        if situation != "architecture" or facts.lower_solver in ("sgd", "momentum"):
            return None
        memory, estimate = architecture_memory_mb(facts)["rarts"], memory_estimate(facts)
        if memory > facts.memory_mb:
            return None
        return Proposal(RartsConfig(), [
            architecture_reason(facts),
            f"levels.{facts.lower_level}.solver.name = {facts.lower_solver}: DARTS's second-order virtual step is defined"
            " for sgd and momentum weight updates, so RARTS is used: first order (no mixed second derivatives), it"
            " trains a tied copy of the weights on the validation data and, unlike first-order DARTS, reaches the"
            f" bilevel optimum of the analytic toy as its coupling grows (about {memory:.0f} MiB; {estimate})"])

