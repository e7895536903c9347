"""Any engine run through the fast path: the same engine interface, its calls executed by a
:class:`~bilevel.fastpath.accelerator.FastPath` built from the config's ``fast_path`` and
``precision`` (see docs/fastpath.md).

The wrapper installs the FastPath as the engine's execution policy (``engine.execution``), so the
engine's inner loop and products run captured, compiled or in reduced precision where allowed,
and runs each call through it (a whole-hypergradient CUDA graph where the engine declares
``capabilities.graph_safe``). The algorithm itself stays in the engine, written once."""

from __future__ import annotations

from typing import Any

from bilevel.engines.base import Engine, Proposal
from bilevel.engines.results import Hypergrad
from bilevel.engines.state import EngineState
from bilevel.fastpath.accelerator import FastPath
from bilevel.problem import Params, Problem

__all__ = ["Accelerated", "accelerated"]


class Accelerated:
    """``engine`` with its calls executed by a FastPath (implements the Engine protocol by delegation)."""

    def __init__(self, engine: Any):
        self.engine = engine
        config = engine.config
        self.fast = FastPath(getattr(config, "fast_path", "off"), getattr(config, "precision", None),
                             graph_safe=engine.capabilities.graph_safe)
        engine.execution = self.fast
        self.kind = engine.kind
        self.Config = engine.Config
        self.State = engine.State
        self.capabilities = engine.capabilities
        self.priority = engine.priority

    @property
    def config(self) -> Any:
        return self.engine.config

    def init(self, problem: Problem, x: Params) -> EngineState:
        return self.engine.init(problem, x)

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        return self.fast.hypergrad(self.engine.hypergrad, problem, x, state, batch)

    def post_step(self, problem: Problem, x: Params, state: EngineState) -> tuple[Params, EngineState]:
        return self.engine.post_step(problem, x, state)

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        return self.engine.lower_solution(problem, x, state)

    def execution_report(self) -> dict[str, Any]:
        """How the hypergradients were executed, and why (result.json's ``fast_path``)."""
        return self.fast.report()

    def configure(self, facts: Any, situation: str) -> Proposal | None:
        return self.engine.configure(facts, situation)

    def explain(self, config: Any, facts: Any) -> Proposal:
        return self.engine.explain(config, facts)

    def refusals(self, config: Any, facts: Any) -> list[tuple[str, str]]:
        return self.engine.refusals(config, facts)

    def __getattr__(self, name: str) -> Any:  # the engine's own helpers (e.g. DARTS's xi)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


def accelerated(engine: Any) -> Engine:
    """``engine`` wrapped so that its calls run through the fast path."""
    return Accelerated(engine)
