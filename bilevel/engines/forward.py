"""Forward-mode hypergradients through the inner optimizer (FHG) and their real-time variant (RTHO).

With s_t = (y_t, optimizer state) and one inner step s_t = Phi_t(x, s_{t-1}), the tangent
Z_t = ds_t/dx (one column per scalar of x) obeys the forward recursion of Franceschi et al.
(2017, "Forward and Reverse Gradient-Based Hyperparameter Optimization", ICML; Williams & Zipser
1989 for recurrent networks):

    Z_0 = 0 (the start is a constant, as in warm-started unrolling),
    Z_t = A_t Z_{t-1} + B_t,        A_t = dPhi_t/ds,  B_t = dPhi_t/dx,
    dF/dx = grad_x F(x, y_T) + grad_y F(x, y_T) . Z_T.

A_t Z_{t-1} + B_t for column k is one Jacobian-vector product of the step at (x, s_{t-1}) with
tangent (e_k, Z_{t-1}[k]): ``torch.func.jvp`` through the inner optimizer's own step
(``bilevel.engines.functional.functional_step``: its gradient, ``InnerOptimizer.step`` with its
state, schedules and hypergradient descent, the projection), the n_x columns batched with
``torch.func.vmap``. The result equals reverse-mode unrolling through the same T steps (the same
derivative, in the other order). Memory: the tangents, n_x copies of y and of the optimizer
state, whatever T is; time: n_x Jacobian-vector products per step. So forward mode suits a few
hyperparameters tuned over a long horizon, reverse mode many hyperparameters over a short one.

**RTHO** (``online: true``, the same paper, section 4): the weights and the tangents are not
reset between calls. Each call continues the training run for ``solver.steps`` = Delta steps from
where the last one stopped, carrying Z across calls while x changes, and returns
grad_x F + grad_y F . Z at the current point: the hyperparameters are updated every Delta inner
steps during a single training run. At a fixed x whose inner iteration contracts, Z converges to
dy*/dx, so a run that comes to rest does so where the exact hypergradient vanishes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.functional import functional_step, require_one_process
from bilevel.engines.inner import inner_residual, lower_start
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import joint_grad
from bilevel.linalg.tree import tree_flatten, tree_norm, tree_unflatten
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["ForwardConfig", "ForwardEngine", "ForwardState", "forward_memory_mb"]


class ForwardConfig(EngineConfig):
    """Forward-mode differentiation through the inner optimizer (FHG), or its real-time variant (RTHO)."""

    kind: Literal["forward"] = "forward"
    """Discriminator: the forward-mode engine."""
    online: bool = False
    """RTHO: carry the lower iterate, the optimizer state and the tangents across calls (one training
    run, the hyperparameters updated every solver.steps inner steps). False (FHG): every call
    differentiates the solver.steps steps of its own solve from the (warm) start."""


@dataclass
class ForwardState(EngineState):
    """The tangents d y / dx and d (optimizer state) / dx, one leading row per scalar of x (None
    before the first online call)."""

    tangent: Params | None = None
    state_tangent: Params | None = None


def forward_memory_mb(facts: ProblemFacts) -> float:
    """Rough memory of forward mode: n_x tangents of y and of up to two optimizer buffers, plus
    one step's activations for the n_x batched Jacobian-vector products."""
    return facts.bytes_per_scalar * facts.n_upper * (3 * facts.n_lower + facts.lower_batch_numel) / 2**20


def _basis(x: Params) -> Params:
    """The columns e_k of the identity over x's scalars, as tangents of each tensor of x."""
    n = sum(p.numel() for p in x)
    eye = torch.eye(n, dtype=x[0].dtype, device=x[0].device)
    out, start = [], 0
    for p in x:
        out.append(eye[:, start : start + p.numel()].reshape(n, *p.shape))
        start += p.numel()
    return tuple(out)


def _rows(n: int, like: Params) -> Params:
    return tuple(torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device) for p in like)


@register
class ForwardEngine(EngineBase):
    """Forward-mode hypergradients (FHG / RTHO) with memory independent of the horizon."""

    kind: ClassVar[str] = "forward"
    Config: ClassVar[type[ForwardConfig]] = ForwardConfig
    State: ClassVar[type[ForwardState]] = ForwardState
    priority: ClassVar[int] = 75
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="forward-mode differentiation through the inner optimizer (FHG; online: RTHO), memory independent of T",
        needs_hvp=True,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="constant",
        through_optimizer=True,
    )

    def compute(self, problem: Problem, x: Params, state: ForwardState, batch: Any) -> Hypergrad:
        require_one_process(self.kind)
        lower = problem.lower
        optimizer = InnerOptimizer(lower.solver)
        steps = lower.solver.steps
        x = tuple(p.detach() for p in x)
        directions = _basis(x)
        n = directions[0].shape[0]
        online = self.config.online
        if online:
            y, opt_state = state.lower, state.inner_state
            tangent = state.tangent if state.tangent is not None else _rows(n, y)
            state_tangent = state.state_tangent if state.state_tangent is not None else _rows(n, opt_state)
        else:
            y = lower_start(problem, state, x)
            opt_state = optimizer.init(y)
            tangent, state_tangent = _rows(n, y), _rows(n, opt_state)

        grads = None
        for _ in range(steps):
            y, opt_state, tangent, state_tangent, grads = self._step(problem, optimizer, x, y, opt_state, directions,
                                                                     tangent, state_tangent, lower.batch())

        grad_x, grad_y, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        through = sum((g.unsqueeze(0) * z).reshape(n, -1).sum(1) for g, z in zip(grad_y, tangent))
        hypergradient = tree_unflatten(tree_flatten(grad_x) + through, x)

        stats = Stats(
            # the last gradient the inner loop evaluated (at y_{T-1}), as the unrolled engine reports it
            inner_residual=tree_norm(grads).detach() if grads is not None else inner_residual(problem, x, y, lower.batch()),
            linear_residual=None,
            hvp_count=steps * n,
            inner_steps=steps,
        )
        if online:
            new_state = ForwardState(y, opt_state, state.step + 1, tangent=tangent, state_tangent=state_tangent)
        else:
            new_state = ForwardState(y, state.inner_state, state.step + 1)
        return Hypergrad(hypergradient, upper_loss, new_state, stats)

    @staticmethod
    def _step(problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, opt_state: Params, directions: Params,
              tangent: Params, state_tangent: Params, batch: Any) -> tuple[Params, Params, Params, Params, Params]:
        """One inner step and its tangents: Z_t[k] = A_t Z_{t-1}[k] + B_t e_k for every column k at once."""

        def step(xx: Params, yy: Params, ss: Params) -> tuple[tuple[Params, Params], Params]:
            new_y, new_state, grads = functional_step(problem, optimizer, xx, yy, ss, batch)
            return (new_y, new_state), grads

        def column(dx: Params, dy: Params, ds: Params) -> tuple[Any, Any, Params]:
            primal, tangents, grads = torch.func.jvp(step, (x, y, opt_state), (dx, dy, ds), has_aux=True)
            return primal, tangents, grads

        (new_y, new_state), (d_y, d_state), grads = torch.func.vmap(column, out_dims=(None, 0, None))(
            directions, tangent, state_tangent)
        return new_y, new_state, d_y, d_state, grads

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        """Online: the training run as the last call left it (RTHO never restarts it); else the
        inner solver's steps from the warm start."""
        if self.config.online:
            return state.lower
        return super().lower_solution(problem, x, state)

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation != "online_tuned_step":
            return None
        forward, reverse = forward_memory_mb(facts), facts.unrolled_memory_mb(facts.inner_steps)
        if forward >= reverse:
            return None
        return Proposal(ForwardConfig(), [
            f"levels.{facts.lower_level}.solver.tuned names {', '.join(facts.tuned_step)}: these change the path of the"
            " inner optimizer but not the lower solution, so the hypergradient is taken through the optimizer's steps",
            f"{facts.n_upper} upper scalars over a horizon of {facts.inner_steps} inner steps: forward mode carries"
            f" {facts.n_upper} tangents of the lower iterate and optimizer state, about {forward:.3g} MiB whatever the"
            f" horizon, where reverse-mode unrolling would store the {facts.inner_steps} steps, about {reverse:.3g} MiB;"
            f" the price is {facts.n_upper} Jacobian-vector products per step (Franceschi et al. 2017)"])

    @classmethod
    def refusals(cls, config: ForwardConfig, facts: ProblemFacts) -> list[tuple[str, str]]:
        out = []
        if facts.closed_form:
            out.append((f"levels.{facts.lower_level}.solution",
                        f"the {cls.kind} engine differentiates the inner solver's steps; a closed-form lower solution"
                        " has none (use engine: implicit, which differentiates the solution exactly)"))
        return out
