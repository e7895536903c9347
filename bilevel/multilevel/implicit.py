"""Implicit differentiation through a chain of levels (nested IFT).

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

import time
from typing import Any, ClassVar

import torch

from bilevel.engines.base import Capabilities, EngineBase, EngineState, Hypergrad, Stats
from bilevel.engines.inner import solve_lower
from bilevel.linalg.hvp import grad_and_value
from bilevel.linalg.solve import LinearSolver, make_linear_solver
from bilevel.linalg.tree import tree_norm
from bilevel.multilevel.chain import ChainProblem
from bilevel.multilevel.registry import register_chain_engine
from bilevel.multilevel.solution import Objective, SolveLog, argmin
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params
from bilevel.spec.engine import ImplicitConfig

__all__ = ["ChainImplicitEngine", "reduced_objective"]


def reduced_objective(
    problem: ChainProblem, k: int, solutions: list[Params | None], batches: list[Any], solvers: list[LinearSolver | None],
    log: SolveLog,
) -> Objective:
    """phi_k(above, z_k): f_k with every level below k attached at its stored solution as an
    ``argmin`` node (differentiable in the levels above it). ``above`` is the flat tuple of
    levels 0..k-1; ``solutions[j]``, ``batches[j]`` and ``solvers[j]`` belong to level j (the
    linear solver of level j's Hessian; the top level has none)."""
    sizes = [len(level.init) for level in problem.chain[:k]]

    def phi(above: Params, z: Params) -> torch.Tensor:
        params: list[Params] = []
        start = 0
        for size in sizes:
            params.append(tuple(above[start : start + size]))
            start += size
        params.append(tuple(z))
        for j in range(k + 1, problem.depth):
            below = reduced_objective(problem, j, solutions, batches, solvers, log)
            params.append(argmin(below, problem.join(params), solutions[j], solvers[j], log, problem.chain[j].name))
        return problem.objective(k, params, batches[k])

    return phi


class _Nested:
    """One hypergradient's worth of work: linear solvers per level, costs, inner steps."""

    def __init__(self, problem: ChainProblem, config: ImplicitConfig):
        self.problem = problem
        # one per lower level (Neumann's default step is that level's inner lr); none for the top
        self.solvers: list[LinearSolver | None] = [None]
        self.solvers += [make_linear_solver(config.linear_solver, level.solver.lr) for level in problem.chain[1:]]
        self.log = SolveLog()
        self.steps = 0

    def solve(self, k: int, above: list[Params], starts: list[Params]) -> list[Params]:
        """Levels k..K-1 solved given the levels above (no graph); ``starts`` are their starting points."""
        problem = self.problem
        level = problem.chain[k]
        optimizer = InnerOptimizer(level.solver)
        if k == problem.depth - 1:
            y, _ = solve_lower(problem.bottom_pair, optimizer, problem.join(above), starts[0], optimizer.init(starts[0]), level.solver.steps)
            self.steps += level.solver.steps
            return [y]
        z, below = starts[0], list(starts[1:])
        state = optimizer.init(z)
        hyper = problem.hyperparameters(k, above)
        for _ in range(level.solver.steps):
            below = self.solve(k + 1, [*above, z], problem.starts(k + 1, below))
            grads = self.gradient(k, above, z, below)
            z, state = optimizer.step(z, grads, state, hyper)
            z = level.project(z)
            self.steps += 1
        below = self.solve(k + 1, [*above, z], problem.starts(k + 1, below))
        return [z, *below]

    def gradient(self, k: int, above: list[Params], z: Params, below: list[Params]) -> Params:
        """grad phi_k(above, z) on fresh batches, through the implicit derivatives of the levels below."""
        problem = self.problem
        batches = [None] * k + [level.batch() for level in problem.chain[k:]]
        solutions: list[Params | None] = [None] * (k + 1) + list(below)
        phi = reduced_objective(problem, k, solutions, batches, self.solvers, self.log)
        flat = tuple(p.detach() for p in problem.join(above))
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in z)
            grads, _ = grad_and_value(lambda zz: phi(flat, zz), leaves)
        return tuple(g.detach() for g in grads)


@register_chain_engine
class ChainImplicitEngine(EngineBase):
    """Nested implicit differentiation through a chain of strongly convex lower levels."""

    kind: ClassVar[str] = "implicit"
    Config: ClassVar[type[ImplicitConfig]] = ImplicitConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="nested implicit differentiation: one linear solve per level, HVPs of each reduced objective"
        " through the implicit derivatives of the levels below it",
        needs_hvp=True,
        lower_convexity=("strongly_convex",),
        memory="constant",
        exact_when_converged=True,
    )

    @staticmethod
    def unsupported(config: ImplicitConfig) -> dict[str, str]:
        """Options of the two-level engine that a chain cannot use: dotted field -> why."""
        out = {}
        if config.hvp != "reverse":
            out["hvp"] = "forward-mode products cannot differentiate through the implicit derivatives of lower levels; use reverse"
        if config.linear_solver.method == "direct":
            out["linear_solver.method"] = ("the direct solve assembles H with batched products, which do not pass through"
                                           " the implicit derivatives of lower levels; use cg or neumann")
        return out

    def __init__(self, config: ImplicitConfig | None = None):
        super().__init__(config)
        problems = self.unsupported(self.config)
        if problems:
            raise ValueError("; ".join(f"engine.{field}: {why}" for field, why in problems.items()))

    def init(self, problem: ChainProblem, x: Params) -> EngineState:  # type: ignore[override]
        return EngineState(problem.fresh(problem.lower.init), ())

    def solve_below(self, problem: ChainProblem, x: Params, state: EngineState) -> Params:
        """The levels below the top solved at x (warm-started from ``state``), as ``lower``'s flat tuple."""
        nested = _Nested(problem, self.config)
        starts = problem.starts(1, problem.split(state.lower))
        return problem.join(nested.solve(1, [tuple(p.detach() for p in x)], starts))

    def hypergrad(self, problem: ChainProblem, x: Params, state: EngineState, batch: Any) -> Hypergrad:  # type: ignore[override]
        start = time.perf_counter()
        nested = _Nested(problem, self.config)
        starts = problem.starts(1, problem.split(state.lower))
        solutions = nested.solve(1, [tuple(p.detach() for p in x)], starts)

        top = SolveLog()
        batches = [batch, *(level.batch() for level in problem.chain[1:])]
        phi = reduced_objective(problem, 0, [None, *solutions], batches, nested.solvers, top)
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
            time_s=time.perf_counter() - start,
            extra=per_level,
        )
        new_state = EngineState(problem.join(solutions), (), {}, state.step + 1)
        return Hypergrad(tuple(g.detach() for g in grad), upper_loss.detach(), new_state, stats)
