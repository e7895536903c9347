"""Implicit differentiation through a chain of levels (nested IFT): the implicit engine's
algorithm for more than two levels (``bilevel.engines.implicit``).

For a chain z_0 (top) -> z_1 -> ... -> z_{K-1} (bottom), level k >= 1 minimizes its reduced
objective phi_k(z_0..z_k) = f_k(z_0..z_k, z*_{k+1}, ..., z*_{K-1}) (bilevel/multilevel/chain.py).
For three levels a -> b -> c, with H_c = grad^2_cc G_C and J_c = grad^2_c(a,b) G_C:

    c*(a, b):  grad_c G_C = 0,                      dc*/d(a, b) = -H_c^{-1} J_c
    b*(a):     g_B(a, b) = grad_b phi_B = grad_b G_B - (J_c^b)^T H_c^{-1} grad_c G_B = 0
    dF/da = grad_a F~ - (d g_B / d a)^T (d g_B / d b)^{-1} grad_b F~,

where F~(a, b) = F(a, b, c*(a, b)), grad F~ is the two-level implicit hypergradient of the pair
(b, c), and d g_B / d(a, b) are the Hessian blocks of phi_B: Hessian-vector products of phi_B,
obtained by differentiating through the implicit hypergradient g_B (third derivatives of G_C,
products only; see bilevel.multilevel.solution.py).

Algorithm per hypergradient (the same recursion at every depth):
  * solve the chain below the top, warm-started: level k takes its solver's ``steps`` optimizer
    steps on phi_k(above, .); each step first solves the levels below it at the current z_k
    (the bottom level with the shared inner loop), then takes grad phi_k through their implicit
    derivatives (one linear solve per level below);
  * attach every solution to the levels above it as an ``argmin`` node and let autograd
    differentiate F(z_0, z*_1, ..., z*_{K-1}): each node's backward is one linear solve with the
    configured solver (CG / Neumann) on HVPs, and a node differentiated twice solves once more.

Cost: a level solve costs its steps times the solve of the levels below it (for three levels,
T_b (T_c + m) products); the top hypergradient costs about m_b m_c third-order products for the
middle level's linear system, m the linear-solver iterations. Exact when every inner solve and
linear solve converges (the lower levels must be strongly convex in their own variables)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bilevel.engines.inner import solve_lower
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.argmin import Objective, SolveLog, argmin
from bilevel.linalg.hvp import grad_and_value
from bilevel.linalg.solve import LinearSolver, make_linear_solver
from bilevel.linalg.tree import tree_norm
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import LinearSolverSpec

__all__ = ["nested_hypergrad", "reduced_objective", "solve_below"]


def reduced_objective(
    problem: Problem, k: int, solutions: Mapping[int, Params], batches: Mapping[int, Any], solvers: list[LinearSolver | None],
    log: SolveLog,
) -> Objective:
    """phi_k(above, z_k): f_k with every descendant of level k attached at its stored solution as
    an ``argmin`` node (differentiable in its ancestors). ``above`` is the flat tuple of k's
    ancestors; ``solutions[j]``, ``batches[j]`` and ``solvers[j]`` belong to level j (the linear
    solver of level j's Hessian; the top level has none)."""
    ancestors = problem.ancestors(k)
    sizes = [len(problem.chain[a].init) for a in ancestors]

    def phi(above: Params, z: Params) -> torch.Tensor:
        params: list[Any] = [None] * len(problem.chain)
        start = 0
        for a, size in zip(ancestors, sizes):
            params[a] = tuple(above[start : start + size])
            start += size
        params[k] = tuple(z)
        for j in problem.subtree(k)[1:]:  # preorder: each descendant after its ancestors
            below = reduced_objective(problem, j, solutions, batches, solvers, log)
            at = problem.join([params[a] for a in problem.ancestors(j)])
            params[j] = argmin(below, at, solutions[j], solvers[j], log, problem.chain[j].name)
        return problem.objective(k, params, batches[k])

    return phi


class _Nested:
    """One hypergradient's worth of work: linear solvers per level, costs, inner steps."""

    def __init__(self, problem: Problem, linear_solver: LinearSolverSpec):
        self.problem = problem
        # one per lower level (Neumann's default step is that level's inner lr); none for the top
        self.solvers: list[LinearSolver | None] = [None]
        self.solvers += [make_linear_solver(linear_solver, level.solver.lr) for level in problem.chain[1:]]
        self.log = SolveLog()
        self.steps = 0

    def solve(self, k: int, params: list[Any]) -> dict[int, Params]:
        """Level k and its descendants solved given its ancestors' values in ``params`` (no
        graph); the subtree's entries of ``params`` are where their solves start."""
        problem = self.problem
        level = problem.chain[k]
        optimizer = InnerOptimizer(level.solver)
        above = [params[a] for a in problem.ancestors(k)]
        if not problem.children(k):
            y, _ = solve_lower(problem.pair(k), optimizer, problem.join(above), params[k], optimizer.init(params[k]), level.solver.steps)
            self.steps += level.solver.steps
            return {k: y}
        z, below = params[k], {j: params[j] for j in problem.subtree(k)[1:]}
        state = optimizer.init(z)
        hyper = problem.hyperparameters(k, above)
        for _ in range(level.solver.steps):
            below = self._children(k, params, z, below)
            grads = self.gradient(k, above, z, below)
            z, state = optimizer.step(z, grads, state, hyper)
            z = level.project(z)
            self.steps += 1
        below = self._children(k, params, z, below)
        return {k: z, **below}

    def _children(self, k: int, params: list[Any], z: Params, below: Mapping[int, Params]) -> dict[int, Params]:
        """Every child subtree of level k solved at z_k, from its warm or fresh starts."""
        problem = self.problem
        current = list(params)
        current[k] = z
        for j, previous in below.items():
            current[j] = problem.start(j, previous)
        out: dict[int, Params] = {}
        for child in problem.children(k):
            out.update(self.solve(child, current))
        return out

    def gradient(self, k: int, above: list[Params], z: Params, below: Mapping[int, Params]) -> Params:
        """grad phi_k(above, z) on fresh batches, through the implicit derivatives of the levels below."""
        problem = self.problem
        batches = {j: problem.chain[j].batch() for j in problem.subtree(k)}
        phi = reduced_objective(problem, k, below, batches, self.solvers, self.log)
        flat = tuple(p.detach() for p in problem.join(above))
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in z)
            grads, _ = grad_and_value(lambda zz: phi(flat, zz), leaves)
        return tuple(g.detach() for g in grads)

    def below_top(self, x: Params, state: EngineState) -> dict[int, Params]:
        """Every level below the top solved at x, warm-started from ``state``."""
        problem = self.problem
        params: list[Any] = [tuple(p.detach() for p in x), *problem.starts(1, problem.split(state.lower))]
        out: dict[int, Params] = {}
        for child in problem.children(0):
            out.update(self.solve(child, params))
        return out


def solve_below(problem: Problem, linear_solver: LinearSolverSpec, x: Params, state: EngineState) -> Params:
    """The levels below the top solved at x (warm-started from ``state``), as ``lower``'s flat tuple."""
    solutions = _Nested(problem, linear_solver).below_top(x, state)
    return problem.join([solutions[j] for j in range(1, len(problem.chain))])


def nested_hypergrad(problem: Problem, linear_solver: LinearSolverSpec, x: Params, state: EngineState, batch: Any) -> Hypergrad:
    """The nested implicit hypergradient of the top level at x (any depth >= 2; see the module
    docstring), with per-level inner residuals in ``stats.extra``."""
    nested = _Nested(problem, linear_solver)
    solutions = nested.below_top(x, state)

    top = SolveLog()
    batches = {0: batch, **{j: problem.chain[j].batch() for j in range(1, len(problem.chain))}}
    phi = reduced_objective(problem, 0, solutions, batches, nested.solvers, top)
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in x)
        grad, upper_loss = grad_and_value(lambda xx: phi((), xx), leaves)

    per_level = {f"inner_residual.{name}": top.gradient_norms[name] for name in problem.level_names[1:] if name in top.gradient_norms}
    residuals = list(per_level.values())
    worst = [r for r in (top.worst_residual(), nested.log.worst_residual()) if r is not None]
    stats = Stats(
        inner_residual=tree_norm(residuals) if residuals else torch.zeros((), dtype=problem.dtype, device=problem.device),
        linear_residual=torch.stack(worst).max() if worst else None,
        hvp_count=top.matvecs + nested.log.matvecs,
        inner_steps=nested.steps,
        extra=per_level,
    )
    new_state = type(state)(problem.join([solutions[j] for j in range(1, len(problem.chain))]), (), step=state.step + 1)
    return Hypergrad(tuple(grad), upper_loss, new_state, stats)
