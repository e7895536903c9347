"""The first-order inner loop through torch.compile.

``torch.compile`` refuses double backward (AOTAutograd), so only the part of a hypergradient
that needs first derivatives can be compiled: the inner optimizer's steps without a graph
(``bilevel.engines.inner.solve_lower``). One step is

    g = grad_y G(x, y; batch);   (y, s) <- optimizer.step(y, g, s);   y <- Proj(y)

written with ``torch.func.grad`` (which TorchDynamo traces, unlike ``torch.autograd.grad``)
around the same objective, optimizer and projection the eager loop uses, and compiled once per
shape; the loop over steps (and the minibatch draws) stays in Python. Inductor fuses the
elementwise work of a step (softmax, cross-entropy, weights, the optimizer update) into a few
kernels; the matrix products are the same library calls as in eager mode."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bilevel.engines.inner import proximal_step
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem

__all__ = ["CompiledInnerLoop", "first_order_step"]


def first_order_step(
    problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params, batch: Any, hyper: dict[str, torch.Tensor]
) -> tuple[Params, Params]:
    """One inner step as a pure function (what gets compiled): the objective, optimizer and
    projection of ``solve_lower``, with the gradient taken by ``torch.func.grad``."""
    grads = torch.func.grad(lambda yy: problem.lower_objective(x, yy, batch))(tuple(y))
    new_y, new_state = optimizer.step(y, grads, state, hyper)
    return proximal_step(problem, optimizer, x, tuple(new_y), hyper), tuple(new_state)


class CompiledInnerLoop:
    """``solve_lower`` with a compiled step, for one problem and one inner optimizer.

    ``__call__`` has the signature and result of ``bilevel.engines.inner.solve_lower``."""

    def __init__(self, problem: Problem, optimizer: InnerOptimizer, options: dict[str, Any] | None = None):
        self.problem = problem
        self.optimizer = optimizer
        self.compile_seconds = 0.0
        self._calls = 0

        def step(x: Params, y: Params, state: Params, batch: Any, hyper: dict[str, torch.Tensor]) -> tuple[Params, Params]:
            return first_order_step(problem, optimizer, x, y, state, batch, hyper)

        self._step: Callable[..., tuple[Params, Params]] = torch.compile(step, dynamic=False, **(options or {}))

    def __call__(
        self,
        problem: Problem,
        optimizer: InnerOptimizer,
        x: Params,
        y: Params,
        state: Params,
        steps: int = 0,
        batches: Sequence[Any] | None = None,
    ) -> tuple[Params, Params]:
        x = tuple(p.detach() for p in x)
        y = tuple(p.detach() for p in y)
        state = tuple(s.detach() for s in state)
        lower = problem.lower
        hyper = problem.tuned_hyperparameters(x, optimizer.spec.tuned)
        first = self._calls == 0
        started = time.perf_counter()
        with torch.no_grad():
            for index in range(steps if batches is None else len(batches)):
                batch = lower.batch() if batches is None else batches[index]
                y, state = self._step(x, y, state, batch, hyper)
                if first and index == 0:
                    self.compile_seconds = time.perf_counter() - started
        self._calls += 1
        return tuple(p.detach() for p in y), tuple(s.detach() for s in state)
