"""F2SA, a fully first-order bilevel method, as an engine defined outside the package
(Kwon, Kwon, Wright & Nowak 2023, "A Fully First-Order Method for Stochastic Bilevel
Optimization", ICML). A spec loads it with ``plugins: [f2sa.py]``; docs/howto/new-engine.md
walks through this file.

The value-function penalty L_lam(x, y) = F(x, y) + lam (G(x, y) - min_z G(x, z)) has, for a
unique lower solution, grad L_lam -> dF/dx as lam grows (bias O(1/lam)). Per outer step k,
warm-started and with lam_k ramped linearly from lam_init to lam_max:

    T steps:  y <- y - (lr / lam_k) (grad_y F(x, y) + lam_k grad_y G(x, y))   (y solves min F + lam G)
              z <- z - lr grad_y G(x, z)                                       (z solves min G)
    direction d_x = grad_x F(x, y) + lam_k (grad_x G(x, y) - grad_x G(x, z))   (the outer optimizer steps x)

The y step is divided by lam_k because the smoothness of F + lam G grows like lam; with lr below
2 / L_G both loops are stable for every lam. Only gradients: no Hessian-vector products."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from bilevel.engines import Capabilities, EngineBase, EngineState, Hypergrad, Proposal, Stats, register
from bilevel.engines.inner import solve_lower
from bilevel.linalg.hvp import joint_grad
from bilevel.linalg.tree import tree_axpy, tree_norm, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig
from bilevel.spec.level import OptimizerSpec


class F2SAConfig(EngineConfig):
    """F2SA: fully first-order penalty of the value function (Kwon et al. 2023)."""

    kind: Literal["f2sa"] = "f2sa"
    """Discriminator: the F2SA engine."""
    lam_init: Annotated[float, Field(gt=0)] = 1.0
    """Penalty weight lam at the first outer step."""
    lam_max: Annotated[float, Field(gt=0)] = 100.0
    """Penalty weight reached after ``lam_ramp_steps`` outer steps (bias of the direction: O(1/lam))."""
    lam_ramp_steps: Annotated[int, Field(ge=0)] = 0
    """Outer steps of the linear ramp (0: lam_max from the start)."""
    lr: Annotated[float, Field(gt=0)] | None = None
    """Inner step size of z (and lr / lam of y); None: the lower solver's lr."""


@dataclass
class F2SAState(EngineState):
    """y (lower, the penalized solution) and z, the warm-started solution of min_z G(x, z)."""

    z: Params | None = None


def penalty_weight(config: F2SAConfig, step: int) -> float:
    """lam at outer step ``step``: a linear ramp from lam_init to lam_max."""
    if config.lam_ramp_steps == 0 or step >= config.lam_ramp_steps:
        return config.lam_max
    return config.lam_init + (config.lam_max - config.lam_init) * step / config.lam_ramp_steps


@register
class F2SAEngine(EngineBase):
    """Warm-started y and z loops, then the first-order penalty direction for x."""

    kind: ClassVar[str] = "f2sa"
    Config: ClassVar[type[F2SAConfig]] = F2SAConfig
    State: ClassVar[type[F2SAState]] = F2SAState
    priority: ClassVar[int] = 65  # asked before the built-in penalty engine (60) where both apply
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="F2SA: fully first-order value-function penalty with warm-started y and z loops (Kwon et al. 2023)",
        needs_hvp=False,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="constant",
        first_order=True,
        returns_hypergradient=False,
    )

    def init(self, problem: Problem, x: Params) -> F2SAState:
        return dataclasses.replace(super().init(problem, x), z=problem.fresh(problem.lower.init))

    def compute(self, problem: Problem, x: Params, state: F2SAState, batch: Any) -> Hypergrad:
        config, lower = self.config, problem.lower
        lam = penalty_weight(config, state.step)
        lr = config.lr or lower.solver.lr
        steps = lower.solver.steps
        z, _ = solve_lower(problem, InnerOptimizer(OptimizerSpec(name="sgd", lr=lr)), x, state.z, (), steps)
        y = state.lower
        for _ in range(steps):  # gradient steps on F + lam G in y (both objectives on fresh batches)
            upper_batch, lower_batch = problem.upper.batch(), lower.batch()
            _, f_y, _ = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, upper_batch), x, y)
            _, g_y, _ = joint_grad(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y)
            y = lower.project(tuple(p.detach() for p in tree_axpy(-lr / lam, tree_axpy(lam, g_y, f_y), y)))
        lower_batch = lower.batch()
        f_x, _, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        g_x, g_y, _ = joint_grad(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y)
        value_x, _, _ = joint_grad(lambda xx, zz: problem.lower_objective(xx, zz, lower_batch), x, z)
        direction = tree_axpy(lam, tree_sub(g_x, value_x), f_x)
        stats = Stats(inner_residual=tree_norm(g_y).detach(), linear_residual=None, hvp_count=0, inner_steps=2 * steps)
        return Hypergrad(direction, upper_loss, F2SAState(y, state.inner_state, state.step + 1, z=z), stats)

    @classmethod
    def configure(cls, facts: Any, situation: str) -> Proposal | None:
        """Nonconvex lower levels (where the planner asks first-order methods)."""
        if situation != "nonconvex":
            return None
        return Proposal(F2SAConfig(), [
            f"levels.{facts.lower_level}.assumptions.convexity = nonconvex: implicit differentiation does not apply;"
            f" {cls.kind} follows the value-function penalty F + lam (G - min G) with gradients only, y and z each"
            f" warm-started for {facts.inner_steps} steps per outer step (Kwon et al. 2023; bias O(1/lam))"])
