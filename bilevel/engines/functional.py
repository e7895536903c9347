"""The inner step under torch.func transforms (jvp, vmap): what the forward-mode and zero-order
engines step through.

``bilevel.engines.inner`` takes gradients with ``torch.autograd.grad`` on fresh leaves, which a
function transform cannot trace (it calls ``requires_grad_``). Here the gradient of G(x, .) is
``torch.func.grad`` and everything else is the same code: the inner optimizer's own step
(``InnerOptimizer.step``: sgd, momentum, adam, schedules and hypergradient descent) and the
level's projection. So the update differentiated in forward mode, or evaluated at a batch of
perturbed upper variables, is the one every other engine runs. One process only: the gradient
is not summed over data-parallel ranks."""

from __future__ import annotations

from typing import Any

import torch

from bilevel.distributed.reduce import current_world
from bilevel.engines.inner import closed_form_solution
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem

__all__ = ["functional_solve", "functional_step", "require_one_process"]


def functional_step(problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params, batch: Any
                    ) -> tuple[Params, Params, Params]:
    """One optimizer step on G(x, .): (new y, new optimizer state, grad_y G at y)."""
    grads = torch.func.grad(lambda yy: problem.lower_objective(x, yy, batch))(tuple(y))
    new_y, new_state = optimizer.step(y, grads, state, problem.tuned_hyperparameters(x, optimizer.spec.tuned))
    return problem.lower.project(new_y), tuple(new_state), tuple(grads)


def functional_solve(problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params,
                     batches: list[Any]) -> Params:
    """The lower solution at x from (y, state), one step per batch (the closed-form solution on
    the last batch where the level declares one): ``solve_lower`` for use inside vmap."""
    if problem.lower.solution is not None and batches:
        return closed_form_solution(problem, x, y, batches[-1])
    for batch in batches:
        y, state, _ = functional_step(problem, optimizer, x, y, state, batch)
    return y


def require_one_process(kind: str) -> None:
    """A clear error for the engines built on these steps in a data-parallel run."""
    if current_world().active:
        raise ValueError(f"the {kind} engine runs in one process: its inner steps are traced by torch.func, whose"
                         " gradients are not summed over data-parallel ranks; run without torchrun")
