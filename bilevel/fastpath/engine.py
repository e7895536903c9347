"""The base of engines that run through the fast path."""

from __future__ import annotations

from typing import Any, ClassVar

from bilevel.engines.base import EngineBase, EngineState, Hypergrad
from bilevel.fastpath.accelerator import FastPath
from bilevel.problem import Params, Problem

__all__ = ["FastPathEngine"]


class FastPathEngine(EngineBase):
    """An engine whose eager algorithm is ``compute``; ``hypergrad`` runs it through a
    :class:`~bilevel.fastpath.accelerator.FastPath` built from the config's ``fast_path`` and
    ``precision`` (configs without them run eagerly).

    ``graph_safe`` declares that ``compute`` depends on its inputs only through tensors (the
    state's step counter may only be counted, not read): then one captured CUDA graph serves
    every call with the same shapes. An engine whose schedule reads the step (a ramp, periodic
    updates) sets it to False and still gets the compiled or captured inner loop."""

    graph_safe: ClassVar[bool] = True

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.fast = FastPath(
            getattr(self.config, "fast_path", "off"),
            getattr(self.config, "precision", None),
            graph_safe=self.graph_safe,
        )

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        return self.fast.hypergrad(self.compute, problem, x, state, batch)

    def compute(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        """The eager hypergradient (the one implementation of the algorithm)."""
        raise NotImplementedError

    def execution_report(self) -> dict[str, Any]:
        """How the hypergradients were executed, and why (result.json's ``fast_path``)."""
        return self.fast.report()
