"""Unrolled (reverse-mode) differentiation through the inner optimizer.

With y_{t+1} = Phi(x, y_t) the inner optimizer's update on G(x, .), the hypergradient of
F(x, y_T) is computed by backpropagating through the iterates (RHG, Franceschi et al. 2017,
"Forward and Reverse Gradient-Based Hyperparameter Optimization"; Maclaurin et al. 2015):

    a_T = grad_y F(x, y_T);  a_t = (dPhi/dy)^T a_{t+1};  dF/dx = grad_x F + sum_t (dPhi/dx)^T a_{t+1}.

Truncation (T-RHG, Shaban et al. 2019) differentiates through the last K steps only.
Checkpointing stores every k-th iterate and recomputes each segment during the backward pass
(Griewank & Walther 2000): memory O(T/k + k) iterates instead of O(T), for one extra forward.
The result is the exact derivative of the T-step algorithm, whether or not it has converged.

Data-parallel runs: the inner steps sum their gradients over ranks through a differentiable sum,
so the backward pass carries partial adjoints (their sum over ranks is the true adjoint; see
bilevel.distributed.reduce). Segments hand partial adjoints to each other unchanged, and the
adjoint of x is summed once, at the end.

Execution (CUDA graphs, a compiled first-order loop, TF32/bf16) is the fast path's business
(``bilevel.fastpath``); this module is the algorithm."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from bilevel.distributed.reduce import sum_over_ranks
from bilevel.engines.base import Capabilities, EngineState, Hypergrad, Stats
from bilevel.engines.inner import lower_start, inner_residual, inner_step
from bilevel.engines.registry import register
from bilevel.fastpath.engine import FastPathEngine
from bilevel.linalg.tree import tree_add, tree_norm
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import UnrolledConfig

__all__ = ["UnrolledEngine"]


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
class UnrolledEngine(FastPathEngine):
    """Reverse-mode hypergradients through T (or the last K) inner steps, optionally checkpointed."""

    kind: ClassVar[str] = "unrolled"
    Config: ClassVar[type[UnrolledConfig]] = UnrolledConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="reverse-mode differentiation through the inner optimizer (RHG / T-RHG, checkpointed)",
        needs_hvp=True,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="horizon",
        through_optimizer=True,
        handles_instances=True,
    )

    def compute(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        start = time.perf_counter()
        fast = self.fast
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
            time_s=time.perf_counter() - start,
        )
        new_state = EngineState(y_final, state.inner_state, step=state.step + 1)
        return Hypergrad(tuple(g.detach() for g in grad_x), upper_loss.detach(), new_state, stats)
