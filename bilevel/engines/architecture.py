"""What the architecture engines (DARTS, RARTS) share: gradients at fresh leaves, warm-started
weight steps at the lower solver's scheduled rate (``bilevel.schedules``, counted over the whole
search), the warm-up before the first architecture step, and the planning pieces (memory
estimates of one outer step, the first reason of an architecture plan)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bilevel.engines.inner import inner_step
from bilevel.linalg.hvp import grad_and_value
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.schedules import scheduled_value
from bilevel.spec.level import OptimizerSpec
from bilevel.spec.search_space import ArchitectureVariable

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = [
    "architecture_memory_mb",
    "architecture_reason",
    "grad_x",
    "is_scheduled",
    "lower_steps",
    "memory_estimate",
    "solver_at",
    "warmup_steps",
    "weight_steps",
    "weight_steps_before",
]


def grad_x(fn: Callable[[Params], Tensor], x: Sequence[Tensor]) -> tuple[Params, Tensor]:
    """(grad fn(x), fn(x)) at fresh leaves made from x."""
    leaves = tuple(p.detach().requires_grad_(True) for p in x)
    with torch.enable_grad():
        grads, value = grad_and_value(fn, leaves)
    return tuple(g.detach() for g in grads), value.detach()


def is_scheduled(spec: OptimizerSpec) -> bool:
    """Whether a lower solver's learning rate changes over the search (a schedule or a warm-up)."""
    return spec.schedule != "constant" or spec.schedule_warmup > 0


def solver_at(spec: OptimizerSpec, step: int) -> OptimizerSpec:
    """The lower solver at weight step ``step`` (0-based, counted over the whole search): its lr
    replaced by the scheduled rate over ``schedule_steps`` (the spec itself when it has no schedule)."""
    if not is_scheduled(spec):
        return spec
    horizon = spec.schedule_steps or 1  # the spec requires schedule_steps for a scheduled lower solver
    rate = scheduled_value(spec.lr, step, horizon, spec.schedule, spec.final_lr_ratio, spec.power_base, spec.schedule_warmup)
    return spec.model_copy(update={"lr": rate})


def weight_steps_before(call: int, steps: int, warmup: int) -> int:
    """Weight steps taken before hypergradient call ``call`` (0-based) of an engine that takes
    ``warmup`` extra steps in its first call and ``steps`` in every call."""
    return 0 if call == 0 else warmup + call * steps


def lower_steps(
    problem: Problem, optimizer: InnerOptimizer, x: Params, w: Params, state: Params, steps: int, first: int = 0
) -> tuple[Params, Params, Params | None, Any]:
    """``steps`` steps of the lower solver (the shared inner step, warm-started): (w, optimizer
    state, grad_w G before the last step, the last batch). ``first``: the index of the first of
    them among the search's weight steps, which a scheduled solver's rate depends on."""
    x = tuple(p.detach() for p in x)
    grads, batch = None, None
    scheduled = is_scheduled(optimizer.spec)
    with torch.enable_grad():
        for index in range(steps):
            batch = problem.lower.batch()
            leaves = tuple(p.detach().requires_grad_(True) for p in w)
            step_optimizer = InnerOptimizer(solver_at(optimizer.spec, first + index)) if scheduled else optimizer
            w, state, grads = inner_step(problem, step_optimizer, x, leaves, state, batch, create_graph=False)
            w, state = tuple(p.detach() for p in w), tuple(s.detach() for s in state)
    return w, state, grads, batch


def warmup_steps(configured: int | None, problem: Problem) -> int:
    """The warm-up of an architecture engine: its own setting, else the largest warmup_steps of
    the upper level's architecture variables, recognised by their spec (a cell, macro or
    weight-entangled architecture alike; 0 when there is none)."""
    if configured is not None:
        return configured
    specs = [getattr(b.module, "spec", None) for b in problem.upper.modules.values()]
    return max((s.warmup_steps for s in specs if isinstance(s, ArchitectureVariable)), default=0)


def weight_steps(configured: int | None, problem: Problem, call: int) -> tuple[int, int]:
    """(weight steps of hypergradient call ``call``, the index of the first of them among the
    search's weight steps): the lower solver's ``steps``, plus the warm-up in the first call."""
    warmup, steps = warmup_steps(configured, problem), problem.lower.solver.steps
    return steps + (warmup if call == 0 else 0), weight_steps_before(call, steps, warmup)


def architecture_memory_mb(facts: ProblemFacts) -> dict[str, float]:
    """Peak memory estimates (MiB) of one outer step of the architecture engines: activations A of
    one forward/backward plus copies of the weights W held at the peak (first-order DARTS: w, its
    momentum, a gradient; second order adds the virtual weights w' and v = grad_w' L_val, a gradient
    at a time; its exact mixed product keeps the graph of grad_w L_train for a second backward,
    about twice the activations; RARTS: w, y, both momenta and a gradient)."""
    weights = facts.bytes_per_scalar * facts.n_lower / 2**20
    return {
        "darts_first_order": facts.activation_mb + 3 * weights,
        "darts_second_order": facts.activation_mb + 4 * weights,
        "darts_second_order_exact": 2 * facts.activation_mb + 4 * weights,
        "rarts": facts.activation_mb + 5 * weights,
    }


def memory_estimate(facts: ProblemFacts) -> str:
    """The terms of the architecture engines' memory estimates, for their reasons."""
    return (f"estimated peak memory: supernet activations {facts.activation_mb:.0f} MiB for a batch, plus"
            f" {facts.bytes_per_scalar * facts.n_lower / 2**20:.1f} MiB per copy of the {facts.n_lower} weights")


def architecture_reason(facts: ProblemFacts) -> str:
    """Why an architecture problem is searched by the DARTS family (the first reason of its plan)."""
    names = ", ".join(f"levels.{facts.upper_level}.variables.{n}" for n in facts.architecture)
    return (f"{names} is an architecture mixture (kind: architecture): differentiable architecture search, one"
            " warm-started weight step and one architecture step per outer step (the DARTS family) instead of"
            " solving the supernet's training to convergence for every hypergradient")
