"""The engine interface: explicit state, declared capabilities, stats a user can trust.

Everything the runtime and the planner call on an engine is in :class:`Engine`; every built-in
engine derives from :class:`EngineBase`, which holds the shared boilerplate (config, timing and
detaching of the result, the default start state and final lower solution) so that an engine
module contains its algorithm, its Config, its State and how it configures itself.

How an engine's inner loop and products execute (eagerly, in a captured CUDA graph, compiled,
in reduced precision) is an :class:`Execution` policy the engine calls through
(``self.execution``); the fast path (``bilevel.fastpath``) wraps an engine and installs itself
as that policy, so the algorithm is written once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from bilevel.engines.capabilities import Capabilities, Convexity
from bilevel.engines.inner import lower_start, solve_lower, start_state
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = [
    "EAGER",
    "Capabilities",
    "Convexity",
    "Engine",
    "EngineBase",
    "EngineState",
    "Execution",
    "Hypergrad",
    "Proposal",
    "Stats",
]


@dataclass
class Proposal:
    """An engine's configuration for a problem, with the reasons a user reads and warnings."""

    config: Any
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Execution(Protocol):
    """How an engine's first-order inner loop runs and which precision its products use."""

    def solve_lower(self, problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params,
                    steps: int = 0, batches: Sequence[Any] | None = None) -> tuple[Params, Params]: ...

    def reduced_precision(self, problem: Problem) -> contextlib.AbstractContextManager[None]: ...


class _Eager:
    """Plain eager execution in the problem's dtype."""

    def solve_lower(self, problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params,
                    steps: int = 0, batches: Sequence[Any] | None = None) -> tuple[Params, Params]:
        return solve_lower(problem, optimizer, x, y, state, steps, batches)

    def reduced_precision(self, problem: Problem) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


EAGER: Execution = _Eager()


@runtime_checkable
class Engine(Protocol):
    """A hypergradient engine: built from its Config, stateless between calls (everything that
    changes lives in its State), declaring what it assumes (capabilities) and how it configures
    itself for a problem (configure). ``priority`` orders engines that the same planner rule
    admits: the higher one is asked first (no two registered engines share a priority)."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    State: ClassVar[type[EngineState]]
    capabilities: ClassVar[Capabilities]
    priority: ClassVar[int]
    config: Any

    def init(self, problem: Problem, x: Params) -> EngineState: ...

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad: ...

    def post_step(self, problem: Problem, x: Params, state: EngineState) -> tuple[Params, EngineState]: ...

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params: ...

    def execution_report(self) -> dict[str, Any] | None: ...

    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None: ...

    @classmethod
    def explain(cls, config: Any, facts: ProblemFacts) -> Proposal: ...

    @classmethod
    def refusals(cls, config: Any, facts: ProblemFacts) -> list[tuple[str, str]]: ...


class EngineBase:
    """Defaults shared by the engines. A subclass implements ``compute`` (the eager algorithm;
    ``hypergrad`` times it and detaches its result) and, to be chosen by the planner,
    ``configure``."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    State: ClassVar[type[EngineState]] = EngineState
    capabilities: ClassVar[Capabilities]
    priority: ClassVar[int] = 0

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        self.execution: Execution = EAGER

    def init(self, problem: Problem, x: Params) -> EngineState:
        """The lower level's initial values and a fresh inner optimizer state (for more than two
        levels no optimizer state: each level's solve starts its own), as this engine's State
        (its own fields at their defaults; an engine that starts them otherwise replaces them)."""
        start = start_state(problem) if problem.depth == 2 else EngineState(problem.fresh(problem.lower.init))
        return self.State(start.lower, start.inner_state)

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        """One step of the algorithm at x: ``compute``, timed, its result detached."""
        started = time.perf_counter()
        result = self.compute(problem, x, state, batch)
        return result.finished(time.perf_counter() - started, self.capabilities.returns_hypergradient)

    def compute(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        """The eager algorithm (the one implementation the fast path executes)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither compute nor hypergrad")

    def post_step(self, problem: Problem, x: Params, state: EngineState) -> tuple[Params, EngineState]:
        """Called after the outer optimizer moved x; returns (x, state), possibly projected."""
        return x, state

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        """The lower solution at the final x (what the run's final evaluation and report use):
        the inner solver's steps from the warm start."""
        lower = problem.lower
        optimizer = InnerOptimizer(lower.solver)
        y0 = lower_start(problem, state, x)
        y, _ = solve_lower(problem, optimizer, x, y0, optimizer.init(y0), lower.solver.steps)
        return y

    def execution_report(self) -> dict[str, Any] | None:
        """How the calls were executed (result.json's ``fast_path``); None when plainly eager."""
        return None

    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        """This engine's configuration and reasons for a problem in ``situation`` (one of the
        planner's rules, ``bilevel.planner.rules``), or None to decline it."""
        return None

    @classmethod
    def explain(cls, config: Any, facts: ProblemFacts) -> Proposal:
        """Reasons and warnings beyond the planner's own for an explicitly requested config."""
        return Proposal(config)

    @classmethod
    def refusals(cls, config: Any, facts: ProblemFacts) -> list[tuple[str, str]]:
        """(dotted spec path, why) for each way ``config`` cannot solve this problem."""
        return []
