"""One outer step: the engine's direction at x_k, then the outer optimizer's step and the
engine's projection,

    g_k = engine.hypergrad(problem, x_k, state_k)      (lower solve warm-started from state_k)
    x_{k+1} = Proj(outer_optimizer.step(x_k, g_k)),

with one host synchronization to read the loss, the direction's norm and the small upper
variables (for the NaN guard, the progress bar and metrics); nothing inside the inner loop or
the linear solve synchronizes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bilevel.data import begin_outer_step
from bilevel.engines.results import Hypergrad
from bilevel.linalg.tree import tree_norm
from bilevel.runtime.outer import scheduled_lr
from bilevel.runtime.records import TrackedUpper
from bilevel.runtime.session import Session

__all__ = ["StepOutcome", "outer_step"]


@dataclass
class StepOutcome:
    """What one step did: the engine's result, the figures read from the device, and whether the
    run ends here (an engine's stop, or a non-finite loss or direction, with no step applied)."""

    result: Hypergrad
    loss: float = float("nan")
    grad_norm: float = float("nan")
    upper_values: list[float] = field(default_factory=list)
    stop: str | None = None
    diverged: bool = False


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def outer_step(session: Session, tracked: TrackedUpper, step: int, total: int) -> StepOutcome:
    """Outer step ``step`` of ``total`` (0-based) on the session, which it updates in place."""
    problem, engine = session.problem, session.engine
    upper = problem.upper
    begin_outer_step(level.data for level in problem.chain)  # held batches (data.order) are drawn anew
    result = engine.hypergrad(problem, session.x, session.state, upper.batch())
    if result.stop is not None:  # the engine's own criterion ends the run: no step for this call
        session.state = result.state
        if result.upper is not None:
            session.set_upper(result.upper)
        return StepOutcome(result, stop=result.stop)
    read = [result.upper_loss.reshape(1), tree_norm(result.grad).reshape(1), *tracked.read(session.x, result.upper_loss.dtype)]
    loss, grad_norm, *upper_values = torch.cat(read).tolist()  # the one host sync of the step
    outcome = StepOutcome(result, loss, grad_norm, upper_values)
    if not (_finite(loss) and _finite(grad_norm)):
        outcome.diverged = True
        return outcome
    for p, g in zip(session.x, result.grad):
        p.grad = g
    for group in session.optimizer.param_groups:
        group["lr"] = scheduled_lr(upper.solver, step, total)
    session.optimizer.step()
    moved, session.state = engine.post_step(problem, upper.project(session.upper), result.state)
    session.set_upper(moved)
    session.step = step + 1
    return outcome
