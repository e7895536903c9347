"""Unrolled (reverse-mode) differentiation through the inner optimizer.

With y_{t+1} = Phi(x, y_t) the inner optimizer's update on G(x, .), the hypergradient of
F(x, y_T) is computed by backpropagating through the iterates (RHG, Franceschi et al. 2017,
"Forward and Reverse Gradient-Based Hyperparameter Optimization"; Maclaurin et al. 2015):

    a_T = grad_y F(x, y_T);  a_t = (dPhi/dy)^T a_{t+1};  dF/dx = grad_x F + sum_t (dPhi/dx)^T a_{t+1}.

Truncation (T-RHG, Shaban et al. 2019) differentiates through the last K steps only.
Checkpointing stores every k-th iterate and recomputes each segment during the backward pass
(Griewank & Walther 2000): memory O(T/k + k) iterates instead of O(T), for one extra forward.
The result is the exact derivative of the T-step algorithm, whether or not it has converged.
For more than two levels, every level's steps are differentiated through the steps of the levels
below it (``bilevel.engines.nested_unrolled``).

Data-parallel runs: the inner steps sum their gradients over ranks through a differentiable sum,
so the backward pass carries partial adjoints (their sum over ranks is the true adjoint; see
bilevel.distributed.reduce). Segments hand partial adjoints to each other unchanged, and the
adjoint of x is summed once, at the end.

Execution (CUDA graphs, a compiled first-order loop, TF32/bf16) is the fast path's business
(``bilevel.fastpath``); this module is the algorithm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from bilevel.distributed.reduce import sum_over_ranks
from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.inner import inner_residual, inner_step, lower_start
from bilevel.engines.nested_unrolled import nested_unrolled_hypergrad, unrolled_below
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.engines.unrolled_plan import propose, with_nested_memory
from bilevel.linalg.tree import tree_add, tree_norm, zeros_for_none
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig
from bilevel.spec.fastpath import FastPathMode, PrecisionSpec

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["UnrolledConfig", "UnrolledEngine"]


class UnrolledConfig(EngineConfig):
    """Reverse-mode differentiation through the inner optimizer's iterations (RHG / T-RHG)."""

    kind: Literal["unrolled"] = "unrolled"
    """Discriminator: the unrolled engine."""
    truncate: Annotated[int, Field(ge=1)] | None = None
    """Differentiate through the last K inner steps only (T-RHG); None: through all of them."""
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    """Store every k-th inner state and recompute the others during the backward pass:
    memory O(T/k + k) states instead of O(T). None: store every state."""
    first_order: bool = False
    """First-order MAML (Finn et al. 2017, FOMAML): the adaptation's Jacobian taken as the identity,
    so the meta-gradient is grad_x F plus the query gradient at the adapted variables carried back
    to the upper variables they start from (``init_from``) unchanged; no second derivatives, no
    stored steps. Not truncation, which drops that term entirely."""
    fast_path: FastPathMode = "auto"
    """How the hypergradient is executed (the result is the same): auto picks per device (CUDA:
    one CUDA graph of the whole hypergradient; CPU: eager); off: eager; cuda_graph: capture the
    whole hypergradient in a CUDA graph and replay it; compile: the first-order inner loop through
    torch.compile (also captured on CUDA). Falls back to eager, saying why once, where it cannot
    apply (see docs/fastpath.md)."""
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    """Reduced precision (TF32, bf16) for the inner solve and Hessian-vector products, checked
    against full precision."""



def _differentiable_steps(
    problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params, batches: list[Any]
) -> tuple[Params, Params, Params | None]:
    """One inner step per batch, keeping the graph in (x, y, state); also returns the last
    gradient evaluated (grad_y G at the last iterate before the final step), or None."""
    grads = None
    for batch in batches:
        y, state, grads = inner_step(problem, optimizer, x, y, state, batch, create_graph=True)
    return y, state, grads


@register
class UnrolledEngine(EngineBase):
    """Reverse-mode hypergradients through T (or the last K) inner steps, optionally checkpointed."""

    kind: ClassVar[str] = "unrolled"
    Config: ClassVar[type[UnrolledConfig]] = UnrolledConfig
    priority: ClassVar[int] = 70
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="reverse-mode differentiation through the inner optimizer (RHG / T-RHG, checkpointed)",
        needs_hvp=True,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="horizon",
        through_optimizer=True,
        handles_instances=True,
        handles_prox_operators=True,
        differentiates_start=True,
        max_depth=None,
        graph_safe=True,
    )

    def compute(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        if problem.depth > 2:
            problems = _nested_refusals(self.config)
            if problems:
                raise ValueError("; ".join(f"{field}: {why}" for field, why in problems.items()))
            return nested_unrolled_hypergrad(problem, x, state, batch)
        fast = self.execution
        reduced = fast.reduced_precision
        lower = problem.lower
        solver_spec = lower.solver
        optimizer = InnerOptimizer(solver_spec)
        steps = solver_spec.steps
        differentiated = min(self.config.truncate or steps, steps)
        y0 = lower_start(problem, state, x)
        coupled = bool(lower.init_from)  # the start depends on x: its adjoint goes back to x
        if self.config.first_order:
            return self._first_order(problem, optimizer, x, y0, state, batch)

        # steps before the truncation window: no graph
        with reduced(problem):
            y, opt_state = fast.solve_lower(problem, optimizer, x, y0, optimizer.init(y0), steps - differentiated)
        segment = self.config.checkpoint_every or max(differentiated, 1)
        lengths = [min(segment, differentiated - s) for s in range(0, differentiated, segment)] or [0]

        # forward through all but the last segment without a graph, remembering starts and batches
        starts: list[tuple[Params, Params, list[Any]]] = []
        for length in lengths[:-1]:
            batches = [lower.batch() for _ in range(length)]
            starts.append((y, opt_state, batches))
            with reduced(problem):
                y, opt_state = fast.solve_lower(problem, optimizer, x, y, opt_state, batches=batches)

        x_leaf = tuple(p.detach().requires_grad_(True) for p in x)
        needs_start_grad = len(lengths) > 1 or coupled
        with torch.enable_grad():
            y_start = tuple(p.detach().requires_grad_(True) for p in y)
            s_start = tuple(s.detach().requires_grad_(needs_start_grad and s.is_floating_point()) for s in opt_state)
            last_batches = [lower.batch() for _ in range(lengths[-1])]
            with reduced(problem):
                y_end, _, last_grads = _differentiable_steps(problem, optimizer, x_leaf, y_start, s_start, last_batches)
            upper_loss = problem.upper_objective(x_leaf, y_end, batch)
            inputs = x_leaf + (y_start + s_start if needs_start_grad else ())
            with reduced(problem):  # the backward pass: TF32 applies to its products too
                grads = torch.autograd.grad(upper_loss, inputs, allow_unused=True)
        grad_x = zeros_for_none(grads[: len(x)], x_leaf)
        adjoint = grads[len(x) :]

        # backward through the stored segments, recomputing each one with a graph
        for seg_y, seg_state, batches in reversed(starts):
            with torch.enable_grad():
                y_s = tuple(p.detach().requires_grad_(True) for p in seg_y)
                s_s = tuple(s.detach().requires_grad_(s.is_floating_point()) for s in seg_state)
                with reduced(problem):
                    y_e, s_e, _ = _differentiable_steps(problem, optimizer, x_leaf, y_s, s_s, batches)
                    outputs, cotangents = [], []
                    for out, cot in zip((*y_e, *s_e), adjoint):
                        if cot is not None and out.requires_grad:
                            outputs.append(out)
                            cotangents.append(cot)
                    grads = torch.autograd.grad(outputs, x_leaf + y_s + s_s, cotangents, allow_unused=True)
            grad_x = tree_add(grad_x, zeros_for_none(grads[: len(x)], x_leaf))
            adjoint = grads[len(x) :]
        if coupled:  # y_0 = init(x): the adjoint at the start, through the initialization
            grad_x = tree_add(grad_x, _initialization_vjp(problem, x_leaf, adjoint[: len(y0)]))

        # partial adjoints of x and this rank's share of F -> their sums over ranks (no-op in one process)
        *grad_x, upper_loss = sum_over_ranks((*grad_x, upper_loss.detach()))
        y_final = tuple(p.detach() for p in y_end)
        stats = Stats(
            # the last gradient the inner loop evaluated (at y_{T-1}): free, unlike one more evaluation at y_T; with sets or
            # proximal terms the fixed-point residual at y_T (the gradient norm is no measure of convergence there)
            inner_residual=(tree_norm(last_grads).detach() if last_grads is not None and not lower.nonsmooth
                            else inner_residual(problem, x, y_final, lower.batch())),
            linear_residual=None,
            hvp_count=differentiated,
            inner_steps=steps,
        )
        new_state = EngineState(y_final, state.inner_state, step=state.step + 1)
        return Hypergrad(tuple(grad_x), upper_loss, new_state, stats)

    def _first_order(self, problem: Problem, optimizer: InnerOptimizer, x: Params, y0: Params, state: EngineState,
                     batch: Any) -> Hypergrad:
        """FOMAML: T graph-free steps, then grad_x F(x, y_T) + (dy_0/dx)^T grad_y F(x, y_T)."""
        lower = problem.lower
        with self.execution.reduced_precision(problem):
            y, _ = self.execution.solve_lower(problem, optimizer, x, y0, optimizer.init(y0), lower.solver.steps)
        x_leaf = tuple(p.detach().requires_grad_(True) for p in x)
        with torch.enable_grad():
            y_leaf = tuple(p.detach().requires_grad_(True) for p in y)
            upper_loss = problem.upper_objective(x_leaf, y_leaf, batch)
            grads = torch.autograd.grad(upper_loss, x_leaf + y_leaf, allow_unused=True)
        grad_x = tree_add(zeros_for_none(grads[: len(x)], x_leaf), _initialization_vjp(problem, x_leaf, grads[len(x) :]))
        *grad_x, upper_loss = sum_over_ranks((*grad_x, upper_loss.detach()))
        stats = Stats(inner_residual=inner_residual(problem, x, y, lower.batch()), linear_residual=None, hvp_count=0,
                      inner_steps=lower.solver.steps)
        return Hypergrad(tuple(grad_x), upper_loss, EngineState(y, state.inner_state, step=state.step + 1), stats)

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        if problem.depth > 2:
            return unrolled_below(problem, x, state)
        return super().lower_solution(problem, x, state)

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        return propose(facts, situation, UnrolledConfig)

    @classmethod
    def explain(cls, config: UnrolledConfig, facts: ProblemFacts) -> Proposal:
        if facts.depth > 2:
            return with_nested_memory(Proposal(config), facts)
        return Proposal(config)

    @classmethod
    def refusals(cls, config: UnrolledConfig, facts: ProblemFacts) -> list[tuple[str, str]]:
        out = list(_nested_refusals(config).items()) if facts.depth > 2 else []
        if facts.init_from and config.truncate is not None:
            out.append(("engine.truncate", "truncation drops the meta-gradient through the lower level's start (init_from)"
                                           " entirely; use first_order: true for first-order MAML, or null"))
        if config.first_order and not facts.init_from:
            out.append(("engine.first_order", "first-order MAML carries the query gradient back to the upper variables the"
                                              " lower level starts from: declare init_from on the lower level"))
        if config.first_order and (config.truncate is not None or config.checkpoint_every is not None):
            out.append(("engine.first_order", "first_order stores no steps: truncate and checkpoint_every do not apply"))
        return out


def _initialization_vjp(problem: Problem, x: Params, adjoint: Any) -> Params:
    """(dy_0/dx)^T adjoint for the lower start y_0 = initial_lower(x) (``init_from``; summed over
    a batch of tasks that all start at x)."""
    with torch.enable_grad():
        start = problem.initial_lower(x)
        pairs = [(s, a) for s, a in zip(start, adjoint) if a is not None and s.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(p) for p in x)
        grads = torch.autograd.grad([s for s, _ in pairs], x, [a for _, a in pairs], allow_unused=True)
    return zeros_for_none(grads, x)


def _nested_refusals(config: UnrolledConfig) -> dict[str, str]:
    """Options a chain of more than two levels cannot use: dotted spec path -> why."""
    out = {}
    if config.truncate is not None:
        out["engine.truncate"] = "truncation is not available for multilevel problems; use null (every step is differentiated)"
    if config.checkpoint_every is not None:
        out["engine.checkpoint_every"] = "checkpointing is not available for multilevel problems; use null"
    return out
