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

import math
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
from bilevel.linalg.tree import tree_add, tree_norm
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
    fast_path: FastPathMode = "auto"
    """How the hypergradient is executed (the result is the same): auto picks per device (CUDA:
    one CUDA graph of the whole hypergradient; CPU: eager); off: eager; cuda_graph: capture the
    whole hypergradient in a CUDA graph and replay it; compile: the first-order inner loop through
    torch.compile (also captured on CUDA). Falls back to eager, saying why once, where it cannot
    apply (see docs/fastpath.md)."""
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    """Reduced precision (TF32, bf16) for the inner solve and Hessian-vector products, checked
    against full precision."""



def _zeros_for_none(grads: tuple[Any, ...], like: Params) -> Params:
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, like))


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
        y0 = lower_start(problem, state)

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
        needs_start_grad = len(lengths) > 1
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
        grad_x = _zeros_for_none(grads[: len(x)], x_leaf)
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
            grad_x = tree_add(grad_x, _zeros_for_none(grads[: len(x)], x_leaf))
            adjoint = grads[len(x) :]

        # partial adjoints of x and this rank's share of F -> their sums over ranks (no-op in one process)
        *grad_x, upper_loss = sum_over_ranks((*grad_x, upper_loss.detach()))
        y_final = tuple(p.detach() for p in y_end)
        stats = Stats(
            # the last gradient the inner loop evaluated (at y_{T-1}): free, unlike one more evaluation at y_T
            inner_residual=tree_norm(last_grads).detach() if last_grads is not None else inner_residual(problem, x, y_final, lower.batch()),
            linear_residual=None,
            hvp_count=differentiated,
            inner_steps=steps,
        )
        new_state = EngineState(y_final, state.inner_state, step=state.step + 1)
        return Hypergrad(tuple(grad_x), upper_loss, new_state, stats)

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        if problem.depth > 2:
            return unrolled_below(problem, x, state)
        return super().lower_solution(problem, x, state)

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation == "tuned_step":
            return _tuned_step(facts)
        if situation != "fallback":
            return None
        if facts.depth > 2:
            weak = [f"levels.{name}.assumptions.convexity = {conv}" for name, conv in zip(facts.levels[1:], facts.convexity[1:])
                    if conv != "strongly_convex"]
            reason = (f"{'; '.join(weak)}: nested implicit differentiation needs every lower level strongly convex (each"
                      " solution unique, each reduced Hessian invertible), so the hypergradient is taken through the"
                      " optimizers of all levels (nested unrolling), the exact derivative of what they compute")
            return _with_nested_memory(Proposal(UnrolledConfig(), [reason]), facts)
        reason = (f"levels.{facts.lower_level}.assumptions.convexity = {facts.lower_convexity}: the implicit function theorem"
                  " needs a strongly convex lower level, so the hypergradient is taken through the inner optimizer itself"
                  " (unrolled), which is the exact derivative of what the inner solver computes")
        return _fitted(facts, [reason])

    @classmethod
    def explain(cls, config: UnrolledConfig, facts: ProblemFacts) -> Proposal:
        if facts.depth > 2:
            return _with_nested_memory(Proposal(config), facts)
        return Proposal(config)

    @classmethod
    def refusals(cls, config: UnrolledConfig, facts: ProblemFacts) -> list[tuple[str, str]]:
        return list(_nested_refusals(config).items()) if facts.depth > 2 else []


def _nested_refusals(config: UnrolledConfig) -> dict[str, str]:
    """Options a chain of more than two levels cannot use: dotted spec path -> why."""
    out = {}
    if config.truncate is not None:
        out["engine.truncate"] = "truncation is not available for multilevel problems; use null (every step is differentiated)"
    if config.checkpoint_every is not None:
        out["engine.checkpoint_every"] = "checkpointing is not available for multilevel problems; use null"
    return out


def _tuned_step(facts: ProblemFacts) -> Proposal:
    if facts.depth > 2:
        reason = (f"{', '.join(facts.tuned_step_paths)} change the path of the inner optimizer but not the solution it"
                  " reaches: only nested unrolling, which differentiates through every optimizer step, gives them a hypergradient")
        return _with_nested_memory(Proposal(UnrolledConfig(), [reason]), facts)
    reason = (
        f"levels.{facts.lower_level}.solver.tuned names {', '.join(facts.tuned_step)}: these change the path of the inner"
        " optimizer but not the lower solution it converges to, so only differentiating through the optimizer's"
        " steps (unrolled) gives them a hypergradient"
    )
    return _fitted(facts, [reason])


def _fitted(facts: ProblemFacts, reasons: list[str]) -> Proposal:
    """All T steps stored if they fit the memory budget; else checkpointed every sqrt(T); else
    truncated to what fits."""
    steps = facts.inner_steps
    full = facts.unrolled_memory_mb(steps)
    if full <= facts.memory_mb:
        return Proposal(UnrolledConfig(), [*reasons, f"storing all {steps} inner steps needs about {full:.0f} MiB, within"
                                                      f" the {facts.memory_mb:.0f} MiB budget"])
    every = max(1, int(math.ceil(math.sqrt(steps))))
    stored = math.ceil(steps / every) + every
    checkpointed = facts.unrolled_memory_mb(stored)
    if checkpointed <= facts.memory_mb:
        return Proposal(UnrolledConfig(checkpoint_every=every), [
            *reasons,
            f"storing all {steps} inner steps needs about {full:.0f} MiB, over the {facts.memory_mb:.0f} MiB budget:"
            f" checkpointing every {every} steps keeps about {checkpointed:.0f} MiB at the cost of one extra forward pass"])
    per_step = facts.unrolled_memory_mb(1)
    keep = max(1, int(facts.memory_mb // max(per_step, 1e-9)))
    config = UnrolledConfig(truncate=min(keep, steps))
    return Proposal(config, [
        *reasons,
        f"even checkpointed, {steps} inner steps exceed the {facts.memory_mb:.0f} MiB budget: differentiating"
        f" through the last {config.truncate} steps only (truncated, biased)"])


def _with_nested_memory(proposal: Proposal, facts: ProblemFacts) -> Proposal:
    """Nested unrolling's memory estimate against the budget, as a reason (and a warning over it)."""
    memory = (f"nested unrolling stores every step of the nest ({facts.nested_steps()} steps per hypergradient), about"
              f" {facts.nested_unrolled_memory_mb:.3g} MiB")
    if facts.nested_unrolled_memory_mb <= facts.memory_mb:
        return Proposal(proposal.config, [*proposal.reasons, f"{memory}, within the {facts.memory_mb:.0f} MiB budget"],
                        proposal.warnings)
    warning = (f"nested unrolling needs about {facts.nested_unrolled_memory_mb:.0f} MiB, over run.budget.memory_mb ="
               f" {facts.memory_mb:.0f}: lower the inner steps (levels.<name>.solver.steps); checkpointing and"
               " truncation are not available for chains")
    return Proposal(proposal.config, [*proposal.reasons, f"{memory}, over the {facts.memory_mb:.0f} MiB budget"],
                    [*proposal.warnings, warning])
