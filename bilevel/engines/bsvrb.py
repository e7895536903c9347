"""BSVRB (Hu, Zhong, Yang, Yang & Yang 2023, "Blockwise Stochastic Variance-Reduced Methods with
Parallel Speedup for Multi-Block Bilevel Optimization", ICML): m lower problems (blocks) under
shared upper variables, k of them drawn per step,

    min_x F(x) = (1/m) sum_i f_i(x, y_i*(x)),     y_i*(x) = argmin_y g_i(x, y)  (strongly convex),

with the hypergradient (1/m) sum_i [grad_x f_i - grad^2_xy g_i v_i], H_i v_i = grad_y f_i.

Per outer step t, for each drawn block i in S_t (|S_t| = k), on one batch of the block's data
evaluated at the current point (x_t, y_i, v_i) and at the previous one (x_{t-1}, y_i', v_i'),
the block's values at the previous step (the algorithm "BSVRB v2" of the official code, which
tracks v_i by stochastic steps instead of inverting an estimated Hessian):

  * MSVR estimators (Jiang et al. 2022's multi-block single-probe variance reduction):
        s_i <- (1 - alpha) s_i + (alpha + gamma) grad_y g_i(x_t, y_i) - gamma grad_y g_i(x_{t-1}, y_i')
        u_i <- (1 - alpha) u_i + (alpha + gamma) r_i(x_t, y_i, v_i) - gamma r_i(x_{t-1}, y_i', v_i'),
    with r_i = H_i v_i - grad_y f_i the residual of the linear system (two HVPs per point);
  * lazy block updates: a block missed d_i steps since its last draw moves d_i + 1 steps at once
        y_i <- y_i - tau (d_i + 1) s_i,   v_i <- Proj_{||v|| <= v_bound}(v_i - tau_v (d_i + 1) u_i)
    (the same as moving every block every step with its last estimator, as BSVRB v1 does);
  * STORM momentum upstairs (Cutkosky & Orabona 2019), with G = sum_{i in S} [grad_x f_i - grad^2_xy g_i v_i]:
        z <- (1 - beta) (z - G(x_{t-1}, Y', V') / k) + G(x_t, Y, V) / k,
    returned as the step's direction; the outer optimizer takes x <- x - eta z (sgd, lr eta).

The lower step tau is the lower solver's lr; eta is the upper solver's lr. Defaults are the
official code's: alpha = 0.9, gamma = 1, beta = 0.9, tau_v = tau, v_bound = 10 (eta = 1e-3,
tau = 0.5 and k = 10 of m = 100 blocks in its scripts). ``variance_reduction: false`` is the
plain blockwise stochastic method it is compared with: alpha = 1, gamma = 0, beta = 1, every
drawn block one step, no evaluation at the previous point (half the gradient evaluations).

Where this differs from the official code: the previous point starts equal to the initial one
and the estimators s, u, z at zero (the code draws them uniformly from [0, 1)), and v starts at
zero. Engine page: docs/engines/bsvrb.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import Linearization, joint_grad
from bilevel.linalg.tree import tree_norm, tree_sub, tree_zeros_like
from bilevel.problem import Params, Problem
from bilevel.problem.blocks import selected_blocks
from bilevel.spec.engine import EngineConfig

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["BSVRBConfig", "BSVRBEngine", "BSVRBState"]


class BSVRBConfig(EngineConfig):
    """BSVRB (Hu et al. 2023, ICML): blockwise MSVR estimators of the lower gradients and of the
    linear-system residuals for the drawn blocks, STORM momentum upstairs. The lower step tau is
    the lower solver's lr, the upper step eta the upper solver's (sgd)."""

    kind: Literal["bsvrb"] = "bsvrb"
    """Discriminator: the BSVRB engine."""
    variance_reduction: bool = True
    """False: the plain blockwise stochastic method (alpha = 1, gamma = 0, beta = 1, no lazy
    catch-up of missed steps), the baseline BSVRB is compared with."""
    alpha: Annotated[float, Field(gt=0, le=1)] = 0.9
    """MSVR's averaging weight alpha."""
    gamma: Annotated[float, Field(ge=0)] = 1.0
    """MSVR's correction weight gamma."""
    beta: Annotated[float, Field(gt=0, le=1)] = 0.9
    """STORM's weight beta of the new estimate."""
    tau_v: Annotated[float, Field(gt=0)] | None = None
    """Step of the linear-system variables v_i (None: the lower solver's lr, tau)."""
    v_bound: Annotated[float, Field(gt=0)] = 10.0
    """Radius of the ball each block's v_i is projected onto."""


@dataclass
class BSVRBState(EngineState):
    """Every block's iterates and estimators (leading block dimension m), the previous step's
    iterates and x, STORM's z and each block's steps missed since its last draw."""

    v: Params | None = None
    s: Params | None = None
    u: Params | None = None
    lower_prev: Params | None = None
    v_prev: Params | None = None
    x_prev: Params | None = None
    z: Params | None = None
    missed: Params | None = None


@dataclass
class _Point:
    """What one point (x, Y[S], V[S]) gives: grad_y g per block, the residual H v - grad_y f per
    block, G = sum_i (grad_x f_i - grad^2_xy g_i v_i), and the mean upper loss of the drawn blocks."""

    grad_g: Params
    residual: Params
    direction: Params
    loss: Tensor


def _take(params: Params, index: Tensor) -> Params:
    return tuple(p.index_select(0, index) for p in params)


def _put(params: Params, index: Tensor, rows: Params) -> Params:
    return tuple(p.index_copy(0, index, r) for p, r in zip(params, rows))


def _per_block(scale: Tensor, like: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _project_blocks(v: Params, bound: float) -> Params:
    """Each block's v_i (all its tensors together) onto the ball of radius ``bound``."""
    norms = torch.stack([p.reshape(p.shape[0], -1).pow(2).sum(1) for p in v]).sum(0).sqrt()
    scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
    return tuple(p * _per_block(scale, p) for p in v)


@register
class BSVRBEngine(EngineBase):
    """Multi-block bilevel optimization with k of m blocks drawn per step (see the module docstring)."""

    kind: ClassVar[str] = "bsvrb"
    Config: ClassVar[type[BSVRBConfig]] = BSVRBConfig
    State: ClassVar[type[BSVRBState]] = BSVRBState
    priority: ClassVar[int] = 45
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="BSVRB: k of m lower blocks per step, MSVR estimators for y_i and v_i, STORM momentum upstairs",
        needs_hvp=True,
        lower_convexity=("strongly_convex",),
        memory="constant",
        returns_hypergradient=False,
        outer_optimizer="sgd",
        samples_blocks=True,
    )

    def init(self, problem: Problem, x: Params) -> BSVRBState:
        start = super().init(problem, x)
        lower = start.lower
        blocks = lower[0].shape[0]
        return dataclasses.replace(
            start, v=tree_zeros_like(lower), s=tree_zeros_like(lower), u=tree_zeros_like(lower),
            lower_prev=tuple(p.detach().clone() for p in lower), v_prev=tree_zeros_like(lower),
            x_prev=tuple(p.detach().clone() for p in x), z=tree_zeros_like(x),
            missed=(torch.zeros(blocks, device=lower[0].device, dtype=lower[0].dtype),),
        )

    def compute(self, problem: Problem, x: Params, state: BSVRBState, batch: Any) -> Hypergrad:
        if problem.blocks is None:
            raise TypeError("the bsvrb engine needs a lower level of blocks (levels.<lower>.blocks)")
        config = self.config
        sub = selected_blocks(problem)
        index = problem.blocks.indices
        k = int(index.numel())
        lower_batch = problem.lower.batch()
        tau = problem.lower.solver.lr
        tau_v = config.tau_v if config.tau_v is not None else tau

        def point(xx: Params, y: Params, v: Params) -> _Point:
            lin = Linearization(lambda a, b: sub.lower_objective(a, b, lower_batch), xx, y)
            # k F_S = sum_i f_i: per-block gradients are the blocks' own (F_S is their mean)
            gx, gy, loss = joint_grad(lambda a, b: k * sub.upper_objective(a, b, batch), xx, y)
            hv = lin.hvp(v)
            mixed = lin.vjp_x(v)
            return _Point(tuple(g.detach() for g in lin.grad_y), tree_sub(hv, gy), tree_sub(gx, mixed), loss / k)

        y, v = _take(state.lower, index), _take(state.v, index)
        new = point(x, y, v)
        if config.variance_reduction:
            old = point(state.x_prev, _take(state.lower_prev, index), _take(state.v_prev, index))
            a, g = config.alpha, config.gamma
            s = tuple((1 - a) * si + (a + g) * n - g * o for si, n, o in zip(_take(state.s, index), new.grad_g, old.grad_g))
            u = tuple((1 - a) * ui + (a + g) * n - g * o for ui, n, o in zip(_take(state.u, index), new.residual, old.residual))
            b = config.beta
            z = tuple((1 - b) * (zi - o / k) + n / k for zi, n, o in zip(state.z, new.direction, old.direction))
            steps = state.missed[0].index_select(0, index) + 1
        else:
            s, u = new.grad_g, new.residual
            z = tuple(n / k for n in new.direction)
            steps = torch.ones(k, device=index.device, dtype=state.missed[0].dtype)
        y_new = tuple(p - tau * _per_block(steps, p) * si for p, si in zip(y, s))
        v_new = _project_blocks(tuple(p - tau_v * _per_block(steps, p) * ui for p, ui in zip(v, u)), config.v_bound)
        missed = (state.missed[0] + 1).index_fill(0, index, 0)

        new_state = BSVRBState(
            _put(state.lower, index, y_new), state.inner_state, state.step + 1,
            v=_put(state.v, index, v_new), s=_put(state.s, index, s), u=_put(state.u, index, u),
            lower_prev=state.lower, v_prev=state.v, x_prev=tuple(p.detach().clone() for p in x), z=tuple(z),
            missed=(missed,),
        )
        evaluations = 2 if config.variance_reduction else 1
        stats = Stats(
            inner_residual=tree_norm(new.grad_g).detach(),
            linear_residual=None,
            hvp_count=2 * evaluations,
            inner_steps=1,
            extra={"block_updates": float(k), "block_evaluations": float(k * evaluations),
                   "linear_residual_norm": tree_norm(new.residual).detach()},
        )
        return Hypergrad(tuple(z), new.loss, new_state, stats)

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        """Every block's iterate as the last step left it (a single-loop method: y_i tracks y_i*(x))."""
        return state.lower

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation != "sampled_blocks":
            return None
        return Proposal(BSVRBConfig(), [
            f"{facts.blocks_path}: {facts.blocks_sampled} of {facts.blocks} blocks are drawn per outer step, so each"
            " block keeps its own iterate between draws: bsvrb (Hu et al. 2023) updates the drawn blocks with"
            " variance-reduced (MSVR) estimators of their lower gradients and linear-system residuals, and the upper"
            " variables with STORM momentum"])

    @classmethod
    def explain(cls, config: BSVRBConfig, facts: ProblemFacts) -> Proposal:
        warnings = []
        if facts.lower_solver != "sgd":
            warnings.append(f"the {cls.kind} engine takes plain steps of the lower solver's lr on each block (its MSVR"
                            f" estimators replace the optimizer); levels.{facts.lower_level}.solver.name ="
                            f" {facts.lower_solver!r} is used for its lr only")
        return Proposal(config, warnings=warnings)

    @classmethod
    def refusals(cls, config: BSVRBConfig, facts: ProblemFacts) -> list[tuple[str, str]]:
        out = []
        if facts.blocks is None:
            out.append((f"levels.{facts.lower_level}", f"the {cls.kind} engine solves a lower level of blocks; declare"
                        f" levels.{facts.lower_level}.blocks (count, sample)"))
        if facts.closed_form:
            out.append((f"levels.{facts.lower_level}.solution", f"the {cls.kind} engine tracks each block's solution by"
                        " its own stochastic steps; a closed-form lower solution is not used (use engine: implicit with"
                        " every block drawn)"))
        return out
