"""What the architecture engines (DARTS, RARTS) share: gradients at fresh leaves, warm-started
weight steps, the warm-up before the first architecture step, and the planning pieces (memory
estimates of one outer step, the first reason of an architecture plan)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bilevel.engines.inner import inner_step
from bilevel.linalg.hvp import grad_and_value
from bilevel.nas.supernet import Architecture
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["architecture_memory_mb", "architecture_reason", "grad_x", "lower_steps", "memory_estimate", "warmup_steps"]


def grad_x(fn: Callable[[Params], Tensor], x: Sequence[Tensor]) -> tuple[Params, Tensor]:
    """(grad fn(x), fn(x)) at fresh leaves made from x."""
    leaves = tuple(p.detach().requires_grad_(True) for p in x)
    with torch.enable_grad():
        grads, value = grad_and_value(fn, leaves)
    return tuple(g.detach() for g in grads), value.detach()


def lower_steps(
    problem: Problem, optimizer: InnerOptimizer, x: Params, w: Params, state: Params, steps: int
) -> tuple[Params, Params, Params | None, Any]:
    """``steps`` steps of the lower solver (the shared inner step, warm-started): (w, optimizer
    state, grad_w G before the last step, the last batch)."""
    x = tuple(p.detach() for p in x)
    grads, batch = None, None
    with torch.enable_grad():
        for _ in range(steps):
            batch = problem.lower.batch()
            leaves = tuple(p.detach().requires_grad_(True) for p in w)
            w, state, grads = inner_step(problem, optimizer, x, leaves, state, batch, create_graph=False)
            w, state = tuple(p.detach() for p in w), tuple(s.detach() for s in state)
    return w, state, grads, batch


def warmup_steps(configured: int | None, problem: Problem) -> int:
    """The warm-up of an architecture engine: its own setting, else the largest warmup_steps of
    the upper level's architecture variables (0 when there is none)."""
    if configured is not None:
        return configured
    return max((b.module.spec.warmup_steps for b in problem.upper.modules.values() if isinstance(b.module, Architecture)), default=0)


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
