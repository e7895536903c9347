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

    def run(self, k: int, params: list[Any], keep_graph: bool) -> dict[int, Params]:
        """Level k and its descendants after their steps, given k's ancestors' values in
        ``params`` (whose subtree entries are the starts). The result is differentiable in the
        ancestors when ``keep_graph``; it is detached otherwise (the levels below k are always
        differentiated through, since level k's steps need their derivative)."""
        problem = self.problem
        level = problem.chain[k]
        optimizer = InnerOptimizer(level.solver)
        z = tuple(p if p.requires_grad else p.detach().requires_grad_(True) for p in params[k])
        state = optimizer.init(z)
        grads: Params | None = None
        above = [params[a] for a in problem.ancestors(k)]
        if not problem.children(k):
            flat = problem.join(above)
            for _ in range(level.solver.steps):
                z, state, grads = inner_step(problem.pair(k), optimizer, flat, z, state, level.batch(), create_graph=keep_graph)
                if not keep_graph:
                    z = tuple(p.detach().requires_grad_(True) for p in z)
                    state = tuple(s.detach() for s in state)
            self._count(level.name, grads, level.solver.steps, keep_graph)
            return {k: z if keep_graph else tuple(p.detach() for p in z)}
        hyper = problem.hyperparameters(k, above)
        below = {j: params[j] for j in problem.subtree(k)[1:]}
        for _ in range(level.solver.steps):
            restart = {j: problem.start(j, previous) for j, previous in below.items()}
            ran: dict[str, dict[int, Params]] = {}

            def reduced(zz: Params, restart: dict[int, Params] = restart, ran: dict[str, dict[int, Params]] = ran) -> torch.Tensor:
                ran["below"] = self._children(k, params, zz, restart, keep_graph=True)  # the levels below, from zz
                current = list(params)
                current[k] = zz
                for j, value in ran["below"].items():
                    current[j] = value
                return problem.objective(k, current, level.batch())

            # the ancestors and the starts of the runs below carry the history of earlier steps:
            # stop_at keeps the gradient partial in z and the call from walking that history
            grads, _ = grad_and_value(reduced, z, create_graph=keep_graph, stop_at=(*problem.join(above), *problem.join(restart.values())))
            below = ran["below"]
            z, state = optimizer.step(z, grads, state, hyper)
            z = level.project(z)
            if not keep_graph:
                z = tuple(p.detach().requires_grad_(True) for p in z)
                state = tuple(s.detach() for s in state)
                below = {j: tuple(p.detach() for p in b) for j, b in below.items()}
        self._count(level.name, grads, level.solver.steps, keep_graph)
        below = self._children(k, params, z, {j: problem.start(j, b) for j, b in below.items()}, keep_graph=keep_graph)
        return {k: z if keep_graph else tuple(p.detach() for p in z), **below}

    def _children(self, k: int, params: list[Any], z: Params, starts: dict[int, Params], keep_graph: bool) -> dict[int, Params]:
        """Every child subtree of level k run at z_k from ``starts``."""
        current = list(params)
        current[k] = z
        for j, value in starts.items():
            current[j] = value
        out: dict[int, Params] = {}
        for child in self.problem.children(k):
            out.update(self.run(child, current, keep_graph))
        return out

    def below_top(self, x: Params, state: EngineState, keep_graph: bool) -> dict[int, Params]:
        """Every level below the top after its steps at x, warm-started from ``state``."""
        problem = self.problem
        params: list[Any] = [x, *problem.starts(1, problem.split(state.lower))]
        out: dict[int, Params] = {}
        for child in problem.children(0):
            out.update(self.run(child, params, keep_graph))
        return out

    def _count(self, name: str, grads: Params | None, steps: int, differentiated: bool) -> None:
        self.steps += steps
        self.differentiated += steps if differentiated else 0
        if grads is not None:
            self.last_grads[name] = tuple(g.detach() for g in grads)


def unrolled_below(problem: Problem, x: Params, state: EngineState) -> Params:
    """The levels below the top after their steps at x (warm-started from ``state``), detached."""
    with torch.enable_grad():
        below = _Unroll(problem).below_top(tuple(p.detach() for p in x), state, keep_graph=False)
    return problem.join([below[j] for j in range(1, len(problem.chain))])


def nested_unrolled_hypergrad(problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
    """Reverse mode through the whole nest at x (see the module docstring), with per-level inner
    residuals in ``stats.extra``."""
    unroll = _Unroll(problem)
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in x)
        below = unroll.below_top(leaves, state, keep_graph=True)
        upper_loss = problem.objective(0, [leaves, *(below[j] for j in range(1, len(problem.chain)))], batch)
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
    new_state = type(state)(tuple(p.detach() for p in problem.join([below[j] for j in range(1, len(problem.chain))])), (),
                            step=state.step + 1)
    return Hypergrad(grad, upper_loss, new_state, stats)
