"""LV-HBA (Yao, Yu, Zeng & Zhang 2024, "Constrained Bi-Level Optimization: Proximal Lagrangian
Value Function Approach and Hessian-free Algorithm", ICLR): lower levels with constraints
g(x, y) <= 0 (or == 0) that may couple both levels; single loop; first derivatives only; no
strong convexity of the lower level needed.

The proximal Lagrangian value function

    v_gamma(x, y, z) = min_theta max_{lam in Z}  G(x, theta) + <lam, g(x, theta)>
                                               + ||theta - y||^2 / (2 gamma1) - ||lam - z||^2 / (2 gamma2)

turns the problem into min F(x, y) s.t. G(x, y) - v_gamma(x, y, z) <= 0, (x, y) in C. Per step k,
with c_k = c0 (k + 1)^p:

    theta <- theta - eta (grad_y G(x, theta) + lam^T grad_y g(x, theta) + (theta - y) / gamma1)
    lam   <- Proj_Z(lam + eta (g(x, theta) - (lam - z) / gamma2))                 (theta before its step)
    d_x = grad_x F(x, y) / c_k + grad_x G(x, y) - grad_x G(x, theta) - lam^T grad_x g(x, theta)   (returned)
    d_y = grad_y F(x, y) / c_k + grad_y G(x, y) - (y - theta) / gamma1
    (x, y) <- Proj_C((x, y) - alpha (d_x, d_y));   z <- Proj_Z(z + beta (lam - z) / gamma2)

Z is a box: [0, B] per inequality, [-B, B] per equality. The outer optimizer takes the x step
(use {name: sgd, lr: alpha}); ``post_step`` projects (x, y) jointly onto the constraints declared
``affine`` (exactly) and y onto its simple sets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.inner import stationarity
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import joint_grad
from bilevel.linalg.project import project_affine
from bilevel.linalg.tree import tree_add, tree_axpy, tree_scale, tree_sub
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["LVHBAConfig", "LVHBAEngine", "LVHBAState"]


class LVHBAConfig(EngineConfig):
    """LV-HBA (Yao et al. 2024): proximal Lagrangian value function, single loop, Hessian-free;
    lower levels with (coupled) functional constraints."""

    kind: Literal["lv_hba"] = "lv_hba"
    """Discriminator: the LV-HBA engine."""
    gamma1: Annotated[float, Field(gt=0)] = 10.0
    """Proximal weight on theta - y."""
    gamma2: Annotated[float, Field(gt=0)] = 10.0
    """Proximal weight on lambda - z."""
    eta: Annotated[float, Field(gt=0)] = 0.03
    """Step of the projected descent-ascent on (theta, lambda)."""
    lower_lr: Annotated[float, Field(gt=0)] = 0.005
    """alpha for y (give the upper level the same step: solver {name: sgd, lr: alpha})."""
    z_lr: Annotated[float, Field(gt=0)] = 0.002
    """beta: step of z <- Proj_Z(z + beta (lambda - z) / gamma2)."""
    c0: Annotated[float, Field(gt=0)] = 1.0
    """c_k = c0 (k + 1)^p weighs the upper objective by 1 / c_k."""
    p: Annotated[float, Field(ge=0, lt=0.5)] = 0.3
    """Growth exponent of c_k."""
    multiplier_bound: Annotated[float, Field(gt=0)] = 1.0
    """Box for the multipliers: [0, B] for inequalities, [-B, B] for equalities."""


@dataclass
class LVHBAState(EngineState):
    """y, and the proximal Lagrangian's variables: theta (its minimizer), lam (the multipliers
    of its max) and z (the multipliers' proximal centre)."""

    theta: Params | None = None
    lam: Params | None = None
    z: Params | None = None


@register
class LVHBAEngine(EngineBase):
    """Proximal Lagrangian value-function method for constrained lower levels."""

    kind: ClassVar[str] = "lv_hba"
    Config: ClassVar[type[LVHBAConfig]] = LVHBAConfig
    State: ClassVar[type[LVHBAState]] = LVHBAState
    priority: ClassVar[int] = 40
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="LV-HBA: proximal Lagrangian value function, Hessian-free, (coupled) lower-level constraints",
        needs_hvp=False,
        lower_convexity=("strongly_convex", "convex"),
        memory="constant",
        returns_hypergradient=False,
        outer_optimizer="sgd",
        first_order=True,
        handles_constraints=True,
        handles_coupled_constraints=True,
    )

    def init(self, problem: Problem, x: Params) -> LVHBAState:
        start = super().init(problem, x)
        values = problem.constraint_values(x, start.lower, problem.lower.batch())
        return dataclasses.replace(start, theta=problem.fresh(start.lower), lam=tuple(torch.zeros_like(v) for v in values),
                                   z=tuple(torch.zeros_like(v) for v in values))

    def _box(self, problem: Problem, values: Params) -> Params:
        bound = self.config.multiplier_bound
        return tuple(
            v.clamp(-bound if c.is_equality else 0.0, bound) for v, c in zip(values, problem.lower.constraints)
        )

    def compute(self, problem: Problem, x: Params, state: LVHBAState, batch: Any) -> Hypergrad:
        cfg = self.config
        lower = problem.lower
        lower_batch = lower.batch()
        c_k = cfg.c0 * (state.step + 1) ** cfg.p
        y, theta, lam, z = state.lower, state.theta, state.lam, state.z

        def lagrangian(xx: Params, tt: Params, mult: Params) -> torch.Tensor:
            value = problem.lower_objective(xx, tt, lower_batch)  # this rank's share of G
            for g, m in zip(problem.constraint_values(xx, tt, lower_batch), mult):
                # constraints are replicated on every rank: their term joins the share with its weight
                term = (m * g).sum()
                value = value + (term if lower.share == 1.0 else lower.share * term)
            return value

        # projected descent-ascent on (theta, lambda), both from the current point
        _, grad_theta, _ = joint_grad(lambda xx, tt: lagrangian(xx, tt, lam), x, theta)
        with torch.no_grad():
            g_theta = problem.constraint_values(x, theta, lower_batch)
            theta = lower.project(tree_axpy(-cfg.eta, tree_add(grad_theta, tree_scale(1 / cfg.gamma1, tree_sub(theta, y))), theta))
            lam = self._box(problem, tuple(m + cfg.eta * (g - (m - zz) / cfg.gamma2) for m, g, zz in zip(lam, g_theta, z)))

        # directions for (x, y)
        f_x, f_y, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        g_x, g_y, _ = joint_grad(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y)
        value_grad_x, _, _ = joint_grad(lambda xx, tt: lagrangian(xx, tt, lam), x, theta)
        d_x = tree_sub(tree_axpy(1 / c_k, f_x, g_x), value_grad_x)
        d_y = tree_sub(tree_axpy(1 / c_k, f_y, g_y), tree_scale(1 / cfg.gamma1, tree_sub(y, theta)))
        with torch.no_grad():
            new_y = tree_axpy(-cfg.lower_lr, d_y, y)
            z = self._box(problem, tuple(zz + cfg.z_lr * (m - zz) / cfg.gamma2 for zz, m in zip(z, lam)))

        stats = Stats(
            inner_residual=stationarity(problem, x, y, g_y),
            linear_residual=None,
            hvp_count=0,
            inner_steps=1,
        )
        new_state = LVHBAState(tuple(p.detach() for p in new_y), state.inner_state, state.step + 1,
                               theta=tuple(t.detach() for t in theta), lam=lam, z=z)
        return Hypergrad(d_x, upper_loss, new_state, stats)

    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation != "constraints":
            return None
        path = f"levels.{facts.lower_level}.constraints"
        coupled = f", {facts.coupled_constraints} of them coupling both levels" if facts.coupled_constraints else ""
        reasons = [
            f"{path} declares {facts.constraints} constraint(s){coupled}: only engines that handle lower-level"
            f" constraints qualify; {cls.kind} treats them through a proximal Lagrangian value"
            " function with first derivatives only, projecting (x, y) onto the constraints declared affine"
        ]
        return Proposal(LVHBAConfig(), reasons)

    def post_step(self, problem: Problem, x: Params, state: EngineState) -> tuple[Params, EngineState]:
        """Project (x, y) onto the affine constraints jointly, then y onto its simple sets."""
        n = len(x)
        w = tuple(x) + tuple(state.lower)
        batch = problem.lower.data.full if problem.lower.data is not None else None
        for index, constraint in enumerate(problem.lower.constraints):
            if not constraint.affine:
                continue

            def value(v: Params, index: int = index) -> torch.Tensor:
                return problem.constraint_values(v[:n], v[n:], batch)[index]

            w = project_affine(value, w, constraint.is_equality)
        state.lower = problem.lower.project(w[n:])
        return w[:n], state
