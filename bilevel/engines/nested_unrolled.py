"""Nested unrolling: reverse-mode differentiation through the optimizers of every level of a
chain, the unrolled engine's algorithm for more than two levels (``bilevel.engines.unrolled``).

Each lower level runs its optimizer for its solver's ``steps`` steps; a step of level k first
runs the levels below it from their current points (all of their steps kept in the graph),
then steps on the gradient of f_k through them:

    z_k <- opt_k(z_k, d/dz_k f_k(above, z_k, z_{k+1}^T(above, z_k), ...)),

the derivative taken with create_graph so that the step is itself differentiable. The top
hypergradient is reverse mode through the whole nest, d/dz_0 f_0(z_0, z_1^T, ..., z_{K-1}^T):
the exact derivative of the algorithm as run, warm starts within the call included, converged or
not (Sato, Tanaka & Takeda 2021, "A Gradient Method for Multilevel Optimization", NeurIPS, who
approximate each level's solution by unrolled gradient steps and backpropagate through them;
Franceschi et al. 2017 for two levels). As the inner loops converge it approaches the nested
implicit hypergradient.

Cost: time and memory are those of the whole nest, T_1 (T_2 (...) + ...) stored steps: for
three levels about T_b (T_c + 1) + T_c steps, each kept with its graph. No assumption on the
lower levels. Truncation and checkpointing are not available for chains."""

from __future__ import annotations

from typing import Any

import torch

from bilevel.engines.inner import inner_step
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import grad_and_value
from bilevel.linalg.tree import tree_norm
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem

__all__ = ["nested_unrolled_hypergrad", "unrolled_below"]


class _Unroll:
    """One run through the nest, counting steps and keeping each level's last gradient."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.steps = 0
        self.differentiated = 0
        self.last_grads: dict[str, Params] = {}

    def run(self, k: int, above: list[Params], starts: list[Params], keep_graph: bool) -> list[Params]:
        """Levels k..K-1 after their steps from ``starts``, given the levels above. The result is
        differentiable in ``above`` when ``keep_graph``; it is detached otherwise (the levels
        below k are always differentiated through, since level k's steps need their derivative)."""
        problem = self.problem
        level = problem.chain[k]
        optimizer = InnerOptimizer(level.solver)
        z = tuple(p if p.requires_grad else p.detach().requires_grad_(True) for p in starts[0])
        state = optimizer.init(z)
        grads: Params | None = None
        if k == problem.depth - 1:
            flat = problem.join(above)
            for _ in range(level.solver.steps):
                z, state, grads = inner_step(problem.bottom_pair, optimizer, flat, z, state, level.batch(), create_graph=keep_graph)
                if not keep_graph:
                    z = tuple(p.detach().requires_grad_(True) for p in z)
                    state = tuple(s.detach() for s in state)
            self._count(level.name, grads, level.solver.steps, keep_graph)
            return [z if keep_graph else tuple(p.detach() for p in z)]
        hyper = problem.hyperparameters(k, above)
        below = list(starts[1:])
        for _ in range(level.solver.steps):
            restart = problem.starts(k + 1, below)
            ran: dict[str, list[Params]] = {}

            def reduced(zz: Params, restart: list[Params] = restart, ran: dict[str, list[Params]] = ran) -> torch.Tensor:
                ran["below"] = self.run(k + 1, [*above, zz], restart, keep_graph=True)  # the levels below, from zz
                return problem.objective(k, [*above, zz, *ran["below"]], level.batch())

            # the levels above and the starts of the run below carry the history of earlier steps:
            # stop_at keeps the gradient partial in z and the call from walking that history
            grads, _ = grad_and_value(reduced, z, create_graph=keep_graph, stop_at=(*problem.join(above), *problem.join(restart)))
            below = ran["below"]
            z, state = optimizer.step(z, grads, state, hyper)
            z = level.project(z)
            if not keep_graph:
                z = tuple(p.detach().requires_grad_(True) for p in z)
                state = tuple(s.detach() for s in state)
                below = [tuple(p.detach() for p in b) for b in below]
        self._count(level.name, grads, level.solver.steps, keep_graph)
        below = self.run(k + 1, [*above, z], problem.starts(k + 1, below), keep_graph=keep_graph)
        return [z if keep_graph else tuple(p.detach() for p in z), *below]

    def _count(self, name: str, grads: Params | None, steps: int, differentiated: bool) -> None:
        self.steps += steps
        self.differentiated += steps if differentiated else 0
        if grads is not None:
            self.last_grads[name] = tuple(g.detach() for g in grads)


def unrolled_below(problem: Problem, x: Params, state: EngineState) -> Params:
    """The levels below the top after their steps at x (warm-started from ``state``), detached."""
    with torch.enable_grad():
        below = _Unroll(problem).run(1, [tuple(p.detach() for p in x)], problem.starts(1, problem.split(state.lower)),
                                     keep_graph=False)
    return problem.join(below)


def nested_unrolled_hypergrad(problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
    """Reverse mode through the whole nest at x (see the module docstring), with per-level inner
    residuals in ``stats.extra``."""
    unroll = _Unroll(problem)
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in x)
        below = unroll.run(1, [leaves], problem.starts(1, problem.split(state.lower)), keep_graph=True)
        upper_loss = problem.objective(0, [leaves, *below], batch)
        grads = torch.autograd.grad(upper_loss, leaves, allow_unused=True)
    grad = tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(leaves, grads))
    per_level = {f"inner_residual.{name}": tree_norm(unroll.last_grads[name]) for name in problem.level_names[1:]
                 if name in unroll.last_grads}
    residuals = list(per_level.values())
    stats = Stats(
        inner_residual=tree_norm(residuals) if residuals else torch.zeros((), dtype=problem.dtype, device=problem.device),
        linear_residual=None,
        hvp_count=unroll.differentiated,
        inner_steps=unroll.steps,
        extra=per_level,
    )
    new_state = type(state)(tuple(p.detach() for p in problem.join(below)), (), step=state.step + 1)
    return Hypergrad(grad, upper_loss, new_state, stats)
