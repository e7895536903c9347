"""What an engine that uses only the lower solution reports about its inner solve, and the reuse
of its previous hypergradient while the inner residual has not moved.

**Reuse.** With threshold tau, at outer step t the warm start y_{t-1} (the previous solution) is
checked at the new upper variables: where r_t = ||grad_y G(x_t, y_{t-1})|| <= tau, y_{t-1} still
solves the lower level to tau, so the previous hypergradient is returned again, without an inner
solve, a linear solve or a mixed product. Its error is that of the change of x only, O(||x_t -
x_s||) since the step s where it was computed, which the outer optimizer's step size bounds. The
test is read on the host once per call (the one documented synchronization of such a call)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from bilevel.engines.inner import inner_residual
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.problem import Params, Problem
from bilevel.spec.optimizer import SECOND_ORDER, OptimizerSpec

__all__ = ["inner_extra", "reuse_hypergradient", "stops_on_residual"]


def stops_on_residual(spec: OptimizerSpec) -> bool:
    """Whether the solve counts its own steps: L-BFGS, Newton-CG, or a stop at ``tol``."""
    return spec.name in SECOND_ORDER or spec.tol is not None


def inner_extra(spec: OptimizerSpec, residual: Tensor, reuse_below: float | None, reused: bool) -> dict[str, Tensor | float]:
    """The stats beside the common ones: whether the inner residual met ``tol`` (with a
    tolerance; a 0-d tensor, 1 or 0 once logged), whether the hypergradient was reused (with
    reuse)."""
    extra: dict[str, Tensor | float] = {}
    if spec.tol is not None:
        extra["inner_converged"] = (residual <= spec.tol).to(residual.dtype)
    if reuse_below is not None:
        extra["hypergradient_reused"] = 1.0 if reused else 0.0
    return extra


def reuse_hypergradient(
    problem: Problem, reuse_below: float | None, x: Params, y0: Params, state: EngineState, batch: Any
) -> Hypergrad | None:
    """The previous hypergradient again, where the option is set, one was computed, and the warm
    start's inner residual at x is <= ``reuse_below``; else None (compute a new one)."""
    previous = getattr(state, "grad", None)
    if reuse_below is None or previous is None:
        return None
    residual = inner_residual(problem, x, y0, problem.lower.batch())
    if not bool(residual <= reuse_below):  # the documented host read
        return None
    with torch.no_grad():
        upper_loss = problem.upper_objective(tuple(p.detach() for p in x), y0, batch)
    stats = Stats(inner_residual=residual, linear_residual=None, hvp_count=0, inner_steps=0,
                  extra=inner_extra(problem.lower.solver, residual, reuse_below, reused=True))
    return Hypergrad(previous, upper_loss, dataclasses.replace(state, lower=y0, step=state.step + 1), stats)
