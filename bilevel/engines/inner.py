"""The inner loop shared by every engine: k steps of the lower level's optimizer on G(x, .).

Under data parallelism each step's gradient is the union's, summed over ranks: as a value in the
graph-free loop, through the differentiable sum in ``inner_step`` (bilevel.distributed.reduce)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from bilevel.distributed.reduce import sum_over_ranks
from bilevel.engines.inner_solvers import LowerSolve, minimize_lower
from bilevel.engines.state import EngineState
from bilevel.hyperparameters import Drawn
from bilevel.linalg.hvp import grad_and_value
from bilevel.linalg.tree import tree_norm, zeros_for_none
from bilevel.minimize import ResidualStop
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.optimizer import SECOND_ORDER

__all__ = [
    "closed_form_solution",
    "inner_residual",
    "inner_solve",
    "inner_step",
    "lower_start",
    "lower_steps",
    "predicted_start",
    "proximal_step",
    "solve_lower",
    "start_state",
    "stationarity",
]


def start_state(problem: Problem) -> EngineState:
    """The state every engine starts from: the lower level's initial values, fresh optimizer state."""
    y = problem.fresh(problem.lower.init)
    return EngineState(y, InnerOptimizer(problem.lower.solver).init(y))


def lower_start(problem: Problem, state: EngineState, x: Params) -> Params:
    """Where the next lower solve starts (detached): at the upper variables the level declares
    ``init_from``; else the previous solution (warm start; never across different tasks) or the
    initial values."""
    lower = problem.lower
    if lower.init_from:
        return problem.initial_lower(tuple(p.detach() for p in x))
    if lower.solver.warm_start and not problem.resamples_tasks:
        return state.lower
    return problem.fresh(lower.init)


def predicted_start(problem: Problem, state: EngineState, x: Params, previous: Params | None) -> Params:
    """``lower_start``, moved by the secant predictor where that start is the warm start: y_t +
    (y_t - y_{t-1}), the linear extrapolation of the path of lower solutions y*(x_t) through its
    last two points (Allgower & Georg 1990, ch. 2). For a level with ``solver.extrapolate``, whose
    engine checks it. ``previous``: y_{t-1}, the lower solution before state.lower (None: there is
    none yet, and the solve starts at y_t)."""
    start = lower_start(problem, state, x)
    if previous is None or start is not state.lower:
        return start
    return tuple(2.0 * a - b for a, b in zip(start, previous))


def inner_step(
    problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params, batch: Any, create_graph: bool
) -> tuple[Params, Params, Params]:
    """One optimizer step on G(x, .); returns (new y, new optimizer state, grad_y G at y).
    With create_graph the step is differentiable in (x, y, state). The gradient is the partial
    derivative in y even when x was computed from y (a warm start in nested unrolling), and it does
    not walk x's graph history (grad_and_value's stop_at; nothing changes when x are leaves)."""
    grads, _ = grad_and_value(lambda yy: problem.lower_objective(x, yy, batch), y, create_graph=create_graph, stop_at=x)
    hyper = problem.tuned_hyperparameters(x, optimizer.spec.tuned)
    new_y, new_state = optimizer.step(y, grads, state, hyper)
    return proximal_step(problem, optimizer, x, new_y, hyper), new_state, grads


def solve_lower(
    problem: Problem,
    optimizer: InnerOptimizer,
    x: Params,
    y: Params,
    state: Params,
    steps: int = 0,
    batches: Sequence[Any] | None = None,
    draw: Callable[[], Mapping[str, Drawn]] | None = None,
) -> tuple[Params, Params]:
    """Optimizer steps from y without building a graph (x is treated as a constant): one per
    entry of ``batches`` when given, else ``steps`` steps on batches drawn from the lower data.
    A lower level with a closed-form solution is solved exactly instead (on the last of
    ``batches``, or on the next lower batch), whenever at least one step is asked for.
    ``draw()``, when given, is called before each step for upper values that replace the current
    ones in that step (STN trains at hyperparameters drawn around the current ones)."""
    y, state, _ = lower_steps(problem, optimizer, x, y, state, steps, batches, draw)
    return y, state


def lower_steps(
    problem: Problem,
    optimizer: InnerOptimizer,
    x: Params,
    y: Params,
    state: Params,
    steps: int = 0,
    batches: Sequence[Any] | None = None,
    draw: Callable[[], Mapping[str, Drawn]] | None = None,
) -> tuple[Params, Params, Params | None]:
    """``solve_lower`` that also returns the last gradient grad_y G it evaluated (None without steps)."""
    solved = inner_solve(problem, optimizer, x, y, state, steps, batches, draw)
    return solved.solution, solved.state, solved.grad


def inner_solve(
    problem: Problem,
    optimizer: InnerOptimizer,
    x: Params,
    y: Params,
    state: Params,
    steps: int = 0,
    batches: Sequence[Any] | None = None,
    draw: Callable[[], Mapping[str, Drawn]] | None = None,
) -> LowerSolve:
    """``solve_lower`` with what the solve did: the steps taken before the residual stop held.

    With ``solver.tol`` a first-order solve stops at the first iterate whose stationarity
    (``stationarity``: ||grad_y G|| for a smooth level) is <= tol: from there every update is
    masked on the device (``bilevel.minimize.ResidualStop``), and the eager loop ends at the next
    of its host reads (every ``check_every`` steps). lbfgs and newton_cg minimize G on one lower
    batch (``bilevel.engines.inner_solvers``)."""
    x = tuple(p.detach() for p in x)
    objective, lower, spec = problem.lower_objective, problem.lower, optimizer.spec
    if lower.solution is not None and (steps > 0 if batches is None else len(batches) > 0):
        batch = lower.batch() if batches is None else batches[-1]
        return LowerSolve(closed_form_solution(problem, x, y, batch), tuple(s.detach() for s in state), None, 0)
    if spec.name in SECOND_ORDER:
        batch = lower.batch() if batches is None else batches[-1]
        return minimize_lower(problem, spec, x, y, steps if batches is None else len(batches), batch)
    hyper = problem.tuned_hyperparameters(x, spec.tuned)
    stop = None if spec.tol is None else ResidualStop(spec.tol, spec.check_every, spec.check_every > 0, y[0])
    taken: torch.Tensor | int = 0
    grads = None
    with torch.enable_grad():  # once, not per step: the update below builds no graph anyway
        for index in range(steps if batches is None else len(batches)):
            batch = lower.batch() if batches is None else batches[index]
            drawn = None if draw is None else draw()
            leaves = tuple(p.detach().requires_grad_(True) for p in y)
            grads = torch.autograd.grad(objective(x, leaves, batch, drawn), leaves, allow_unused=True)
            grads = sum_over_ranks(zeros_for_none(grads, leaves))
            # inputs detached and grads graph-free: the optimizer step records nothing
            new_y, new_state = optimizer.step(tuple(p.detach() for p in leaves), grads, state, hyper)
            new_y = proximal_step(problem, optimizer, x, new_y, hyper)
            if stop is None:
                y, state = new_y, new_state
                continue
            active = stop.observe(stationarity(problem, x, leaves, grads))
            y, state = stop.keep(tuple(p.detach() for p in leaves), new_y), stop.keep(state, new_state)
            taken = taken + active.long()
            if stop.exit(index):
                break
    if stop is None:
        taken = steps if batches is None else len(batches)
    return LowerSolve(tuple(p.detach() for p in y), tuple(s.detach() for s in state), grads, taken)


def proximal_step(
    problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, hyper: Mapping[str, torch.Tensor] | None = None
) -> Params:
    """What follows the optimizer's update of the lower level: the projection onto its sets, and
    for a level with proximal terms prox_{lr g} at the step size lr (tuned by ``hyper`` when it is):
    with sgd, y <- P(y - lr grad G) is proximal gradient descent (ISTA)."""
    lower = problem.lower
    if not lower.proxes:
        return lower.project(y)
    step = hyper["lr"] if hyper and "lr" in hyper else optimizer.spec.lr
    return lower.prox_step(y, step, problem.upper.view(x))


def fixed_point_map(problem: Problem, x: Params, z: Params, step: float) -> Params:
    """P(x, z) of the lower level's fixed-point map T(x, y) = P(x, y - step grad_y G(x, y)): its
    proximal operators at ``step`` and projections (``proximal_step`` at a given step)."""
    lower = problem.lower
    if not lower.proxes:
        return lower.project(z)
    return lower.prox_step(z, step, problem.upper.view(x))


def stationarity(problem: Problem, x: Params, y: Params, grads: Params) -> torch.Tensor:
    """How far y is from a lower solution, from the gradient grad_y G at y: ||grad_y G|| for a
    smooth level; for a level with sets or proximal terms the fixed-point residual of the
    projected / proximal gradient step at the inner step size eta,

        ||y - P(y - eta grad_y G)|| / eta,

    which is ||grad_y G|| where no constraint is active and 0 exactly at a solution (the plain
    gradient norm is not 0 there). Detached."""
    if not problem.lower.nonsmooth:
        return tree_norm(grads).detach()
    with torch.no_grad():
        eta = _fixed_point_step(problem)
        xs, ys = tuple(p.detach() for p in x), tuple(p.detach() for p in y)
        stepped = fixed_point_map(problem, xs, tuple(p - eta * g.detach() for p, g in zip(ys, grads)), eta)
        return tree_norm(tuple((p - q) / eta for p, q in zip(ys, stepped)))


def _fixed_point_step(problem: Problem) -> float:
    """The step eta of the fixed-point residual: the inner solver's constant lr."""
    return float(problem.lower.solver.lr)


def closed_form_solution(problem: Problem, x: Params, y: Params, batch: Any) -> Params:
    """The lower level's closed-form minimizer at x (no graph: engines differentiate it themselves)."""
    lower = problem.lower
    assert lower.solution is not None
    with torch.no_grad():
        values = lower.solution(problem.upper.view(tuple(p.detach() for p in x)), lower.view(y), batch)
    return lower.from_items(values, tuple(p.detach() for p in y))


def inner_residual(problem: Problem, x: Params, y: Params, batch: Any) -> torch.Tensor:
    """||grad_y G(x, y)|| (with sets or proximal terms: the fixed-point residual, ``stationarity``), detached."""
    leaves = tuple(p.detach().requires_grad_(True) for p in y)
    xs = tuple(p.detach() for p in x)
    with torch.enable_grad():
        grads, _ = grad_and_value(lambda yy: problem.lower_objective(xs, yy, batch), leaves)
    return stationarity(problem, xs, y, grads)
