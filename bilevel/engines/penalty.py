"""Value-function penalty, first order (V-PBGD: Shen & Chen 2023, "On Penalty-based Bilevel
Gradient Descent Method", ICML; analysis of the value-function penalty: Kwon et al. 2024, "On
Penalty Methods for Nonconvex Bilevel Optimization and First-Order Stochastic Approximation", ICLR).

The bilevel problem is replaced by the penalized single-level problem

    min_{x, y}  F(x, y) + gamma (G(x, y) - v(x)),     v(x) = min_w G(x, w),

whose solutions approach the bilevel ones as gamma grows (bias O(1/gamma)); no uniqueness or
convexity of the lower solution is assumed. v(x) is tracked by omega, which takes T warm-started
GD steps on G(x, .) per iteration (T = 1 in V-PBGD); by Danskin's theorem grad v(x) = grad_x G(x, omega).
Per outer step, with s = min(1/gamma, 1) (the V-PBGD step scaling):

    d_x = s [grad_x F(x, y) + gamma (grad_x G(x, y) - grad_x G(x, omega))]   (returned; the outer optimizer steps x)
    y  <- Proj_Y(y - lr_y s [grad_y F(x, y) + gamma grad_y G(x, y)])

gamma ramps linearly from gamma_init to gamma_max. Needs only gradients: no HVPs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.inner import solve_lower, stationarity
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import joint_grad
from bilevel.linalg.tree import tree_axpy, tree_scale, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig
from bilevel.spec.level import OptimizerSpec

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["PenaltyConfig", "PenaltyEngine", "PenaltyState", "penalty_weight"]


class PenaltyConfig(EngineConfig):
    """Value-function penalty (V-PBGD; Shen & Chen 2023, Kwon et al. 2024): first order, no HVPs.

    Per step: omega takes ``omega_steps`` warm-started GD steps on G(x, .); then (x, y) step on
    min(1/gamma, 1) [F(x, y) + gamma (G(x, y) - G(x, omega))], gamma ramped linearly."""

    kind: Literal["penalty"] = "penalty"
    """Discriminator: the penalty engine."""
    gamma_init: Annotated[float, Field(ge=0)] = 0.0
    """Penalty weight at step 0."""
    gamma_max: Annotated[float, Field(gt=0)] = 10.0
    """Penalty weight reached after ``gamma_ramp_steps`` (kept after). The bias of the solution
    is O(1/gamma); the steps it needs grow like O(gamma)."""
    gamma_ramp_steps: Annotated[int, Field(ge=0)] = 0
    """Outer steps of the linear ramp from gamma_init to gamma_max (0: gamma_max from the start)."""
    lower_lr: Annotated[float, Field(gt=0)] | None = None
    """Step of y on the penalized objective; None: the lower solver's lr."""
    omega_lr: Annotated[float, Field(gt=0)] | None = None
    """Step of the value-function variable omega on G(x, .); None: the lower solver's lr."""
    omega_steps: Annotated[int, Field(ge=1)] = 1
    """GD steps of omega per outer step (warm-started; T = 1 in V-PBGD)."""
    scale: bool = True
    """Multiply the penalized gradient by min(1/gamma, 1), as V-PBGD does, so that step sizes
    need not shrink by hand as gamma grows."""


@dataclass
class PenaltyState(EngineState):
    """The penalized lower variable y and omega, the warm-started minimizer tracking v(x)."""

    omega: Params | None = None


def penalty_weight(config: PenaltyConfig, step: int) -> float:
    """gamma at outer step ``step``: linear ramp from gamma_init to gamma_max."""
    if config.gamma_ramp_steps == 0 or step >= config.gamma_ramp_steps:
        return config.gamma_max
    return config.gamma_init + (config.gamma_max - config.gamma_init) * step / config.gamma_ramp_steps


@register
class PenaltyEngine(EngineBase):
    """V-PBGD: value-function gap penalty with warm-started omega; first order."""

    kind: ClassVar[str] = "penalty"
    Config: ClassVar[type[PenaltyConfig]] = PenaltyConfig
    State: ClassVar[type[PenaltyState]] = PenaltyState
    priority: ClassVar[int] = 60
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="value-function penalty F + gamma (G - min G), first order (V-PBGD)",
        needs_hvp=False,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="constant",
        returns_hypergradient=False,
        outer_optimizer="sgd",
        first_order=True,
    )

    def init(self, problem: Problem, x: Params) -> PenaltyState:
        return dataclasses.replace(super().init(problem, x), omega=problem.fresh(problem.lower.init))

    def compute(self, problem: Problem, x: Params, state: PenaltyState, batch: Any) -> Hypergrad:
        config = self.config
        lower = problem.lower
        gamma = penalty_weight(config, state.step)
        omega_lr = config.omega_lr or lower.solver.lr
        lower_lr = config.lower_lr or lower.solver.lr
        omega_opt = InnerOptimizer(OptimizerSpec(name="sgd", lr=omega_lr))
        omega, _ = solve_lower(problem, omega_opt, x, state.omega, (), config.omega_steps)

        lower_batch = lower.batch()
        y = state.lower
        f_x, f_y, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        g_x, g_y, _ = joint_grad(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y)
        value_grad_x, _, _ = joint_grad(lambda xx, ww: problem.lower_objective(xx, ww, lower_batch), x, omega)
        scale = min(1.0 / gamma, 1.0) if config.scale and gamma > 0 else 1.0
        # d = s [grad F + gamma (grad G(x, y) - (grad_x G(x, omega), 0))]
        d_x = tree_scale(scale, tree_axpy(gamma, tree_sub(g_x, value_grad_x), f_x))
        d_y = tree_scale(scale, tree_axpy(gamma, g_y, f_y))
        with torch.no_grad():
            y = lower.project(tree_axpy(-lower_lr, d_y, y))

        stats = Stats(
            inner_residual=stationarity(problem, x, state.lower, g_y),
            linear_residual=None,
            hvp_count=0,
            inner_steps=config.omega_steps,
        )
        return Hypergrad(d_x, upper_loss, PenaltyState(y, state.inner_state, state.step + 1, omega=omega), stats)

    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation != "nonconvex":
            return None
        return Proposal(PenaltyConfig(), [
            f"levels.{facts.lower_level}.assumptions.convexity = nonconvex: the lower solution may be non-unique and"
            f" its Hessian indefinite, so implicit differentiation does not apply; {cls.kind} penalizes the value-function"
            " gap G(x, y) - min_w G(x, w) with first derivatives only (bias O(1/gamma), no uniqueness assumed)"])
