"""BO-REP (Hao, Gong & Liu 2024, "Bilevel Optimization under Unbounded Smoothness: A New
Algorithm and Convergence Analysis", ICLR): for upper objectives whose smoothness grows with the
gradient norm (RNNs, LSTMs), with a strongly convex lower level.

Per outer step k:
  * lower: initialization refinement (``refine_steps`` lower steps before the first step), then
    ``lower_steps`` (N) SGD steps every ``update_every`` (I) outer steps, warm-started;
  * linear-system variable: one stochastic step z <- z - nu (H z - grad_y F), H = grad^2_yy G
    (one Hessian-vector product, never a solve);
  * hypergradient estimate  g_k = grad_x F(x, y) - (grad^2_xy G)^T z  (returned);
  * upper: normalized momentum m <- beta m + (1 - beta) g_k, x <- x - eta m / ||m||, done by the
    outer optimizer {name: normalized_momentum, lr: eta, momentum: beta}.

Defaults follow the paper: beta 0.9, nu 1e-2, (N, I) = (10, 2) for data cleaning, (3, 3) for HPO."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.inner import solve_lower, stationarity
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import Linearization, joint_grad
from bilevel.linalg.tree import tree_axpy, tree_norm, tree_sub, tree_zeros_like
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["BORepConfig", "BORepEngine", "BORepState"]


class BORepConfig(EngineConfig):
    """BO-REP (Hao et al. 2024, "Bilevel Optimization under Unbounded Smoothness"): periodic
    lower updates with initialization refinement, a linear-system variable z updated by one
    HVP step per iteration, and (with the upper solver normalized_momentum) normalized momentum."""

    kind: Literal["bo_rep"] = "bo_rep"
    """Discriminator: the BO-REP engine."""
    update_every: Annotated[int, Field(ge=1)] = 2
    """I: update the lower variable every I outer steps."""
    lower_steps: Annotated[int, Field(ge=1)] = 10
    """N: lower SGD steps at each periodic update (the lower solver's lr)."""
    refine_steps: Annotated[int, Field(ge=0)] | None = None
    """Initialization refinement: lower steps before the first outer step; None: the lower
    solver's ``steps``."""
    z_lr: Annotated[float, Field(gt=0)] = 0.01
    """nu: step of z <- z - nu (H z - grad_y F)."""


@dataclass
class BORepState(EngineState):
    """The periodically updated lower variable and z, the running solution of H z = grad_y F."""

    z: Params | None = None


@register
class BORepEngine(EngineBase):
    """Periodic lower updates, one-HVP linear-system steps; pair with normalized momentum."""

    kind: ClassVar[str] = "bo_rep"
    Config: ClassVar[type[BORepConfig]] = BORepConfig
    State: ClassVar[type[BORepState]] = BORepState
    priority: ClassVar[int] = 50
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="BO-REP: periodic lower updates, one HVP step on z per iteration, normalized momentum upstairs",
        needs_hvp=True,
        lower_convexity=("strongly_convex",),
        memory="constant",
        returns_hypergradient=False,
        outer_optimizer="normalized_momentum",
        unbounded_smoothness=True,
    )

    def init(self, problem: Problem, x: Params) -> BORepState:
        start = super().init(problem, x)
        return dataclasses.replace(start, z=tree_zeros_like(start.lower))

    def compute(self, problem: Problem, x: Params, state: BORepState, batch: Any) -> Hypergrad:
        config = self.config
        lower = problem.lower
        optimizer = InnerOptimizer(lower.solver)
        if state.step == 0:
            steps = lower.solver.steps if config.refine_steps is None else config.refine_steps
        elif state.step % config.update_every == 0:
            steps = config.lower_steps
        else:
            steps = 0
        y, _ = solve_lower(problem, optimizer, x, state.lower, optimizer.init(state.lower), steps)

        lower_batch = lower.batch()
        lin = Linearization(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y)
        grad_x, grad_y, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        z = state.z
        residual = tree_sub(lin.hvp(z), grad_y)  # H z - grad_y F
        new_z = tuple(t.detach() for t in tree_axpy(-config.z_lr, residual, z))
        grad = tree_sub(grad_x, lin.vjp_x(new_z))

        stats = Stats(
            inner_residual=stationarity(problem, x, y, lin.grad_y),
            linear_residual=(tree_norm(residual) / tree_norm(grad_y).clamp_min(1e-30)).detach(),
            hvp_count=1,
            inner_steps=steps,
        )
        return Hypergrad(grad, upper_loss, BORepState(y, state.inner_state, state.step + 1, z=new_z), stats)

    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation != "unbounded_smoothness":
            return None
        return Proposal(BORepConfig(), [
            f"levels.{facts.upper_level}.assumptions.smoothness = unbounded (e.g. a recurrent network): {cls.kind} is"
            " designed for upper objectives whose smoothness grows with the gradient, with normalized momentum"
            " upstairs, periodic lower updates and one HVP step on the linear system per iteration"])
