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

import time
from typing import Any, ClassVar

import torch

from bilevel.engines.base import Capabilities, EngineBase, EngineState, Hypergrad, Stats
from bilevel.engines.registry import register
from bilevel.linalg.hvp import joint_grad
from bilevel.linalg.project import project_affine
from bilevel.linalg.tree import tree_add, tree_axpy, tree_norm, tree_scale, tree_sub
from bilevel.problem import Params, Problem
from bilevel.spec.engine import LVHBAConfig

__all__ = ["LVHBAEngine"]


@register
class LVHBAEngine(EngineBase):
    """Proximal Lagrangian value-function method for constrained lower levels."""

    kind: ClassVar[str] = "lv_hba"
    Config: ClassVar[type[LVHBAConfig]] = LVHBAConfig
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

    def init(self, problem: Problem, x: Params) -> EngineState:
        state = super().init(problem, x)
        values = problem.constraint_values(x, state.lower, problem.lower.batch())
        state.extra["theta"] = problem.fresh(state.lower)
        state.extra["lam"] = tuple(torch.zeros_like(v) for v in values)
        state.extra["z"] = tuple(torch.zeros_like(v) for v in values)
        return state

    def _box(self, problem: Problem, values: Params) -> Params:
        bound = self.config.multiplier_bound
        return tuple(
            v.clamp(-bound if c.is_equality else 0.0, bound) for v, c in zip(values, problem.lower.constraints)
        )

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        start = time.perf_counter()
        cfg = self.config
        lower = problem.lower
        lower_batch = lower.batch()
        c_k = cfg.c0 * (state.step + 1) ** cfg.p
        y, theta, lam, z = state.lower, state.extra["theta"], state.extra["lam"], state.extra["z"]

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
            inner_residual=tree_norm(g_y).detach(),
            linear_residual=None,
            hvp_count=0,
            inner_steps=1,
            time_s=time.perf_counter() - start,
        )
        extra = {"theta": tuple(t.detach() for t in theta), "lam": lam, "z": z}
        new_state = EngineState(tuple(p.detach() for p in new_y), state.inner_state, extra, state.step + 1)
        return Hypergrad(tuple(g.detach() for g in d_x), upper_loss.detach(), new_state, stats)

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
