"""bilevel: declarative bilevel and meta-optimization for PyTorch.

Declare an upper and a lower problem as a spec (Python or YAML/JSON); the planner picks a
hypergradient engine and says why; the runtime runs the outer loop and writes readable results."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bilevel.engines import (
        BORepConfig,
        Capabilities,
        DartsConfig,
        EngineBase,
        EngineState,
        Hypergrad,
        ImplicitConfig,
        LinearSolverSpec,
        LVHBAConfig,
        PenaltyConfig,
        QPConfig,
        Proposal,
        RartsConfig,
        Stats,
        StnConfig,
        UnrolledConfig,
        build_engine,
        engine_capabilities,
        engine_kinds,
        register,
    )
    from bilevel.compile import compile_spec
    from bilevel.planner import Plan, ProblemFacts, make_plan
    from bilevel.problem import Problem, VariableView
    from bilevel.reporting import aggregate_runs, load_metrics, load_runs, write_report
    from bilevel.runtime.loop import DivergenceError, RunResult, hypergrad_at_init, run
    from bilevel.runtime.threads import configure_threads
    from bilevel.spec import BilevelSpec, LoadedSpec, SpecError, load_spec, spec_from_data

__version__ = "0.1.0"

__all__ = [
    "BORepConfig",
    "BilevelSpec",
    "Capabilities",
    "DartsConfig",
    "DivergenceError",
    "EngineBase",
    "EngineState",
    "Hypergrad",
    "ImplicitConfig",
    "LVHBAConfig",
    "LinearSolverSpec",
    "LoadedSpec",
    "PenaltyConfig",
    "QPConfig",
    "Plan",
    "Problem",
    "ProblemFacts",
    "Proposal",
    "RartsConfig",
    "RunResult",
    "SpecError",
    "Stats",
    "StnConfig",
    "UnrolledConfig",
    "VariableView",
    "aggregate_runs",
    "build_engine",
    "compile_spec",
    "configure_threads",
    "engine_capabilities",
    "engine_kinds",
    "hypergrad_at_init",
    "load_metrics",
    "load_runs",
    "load_spec",
    "make_plan",
    "register",
    "run",
    "spec_from_data",
    "write_report",
]

_EXPORTS = {
    "aggregate_runs": "bilevel.reporting",
    "load_metrics": "bilevel.reporting",
    "load_runs": "bilevel.reporting",
    "write_report": "bilevel.reporting",
    "configure_threads": "bilevel.runtime.threads",
    "BORepConfig": "bilevel.engines",
    "Capabilities": "bilevel.engines",
    "DartsConfig": "bilevel.engines",
    "EngineBase": "bilevel.engines",
    "EngineState": "bilevel.engines",
    "Hypergrad": "bilevel.engines",
    "ImplicitConfig": "bilevel.engines",
    "LinearSolverSpec": "bilevel.engines",
    "LVHBAConfig": "bilevel.engines",
    "PenaltyConfig": "bilevel.engines",
    "QPConfig": "bilevel.engines",
    "Proposal": "bilevel.engines",
    "RartsConfig": "bilevel.engines",
    "Stats": "bilevel.engines",
    "StnConfig": "bilevel.engines",
    "UnrolledConfig": "bilevel.engines",
    "build_engine": "bilevel.engines",
    "engine_capabilities": "bilevel.engines",
    "engine_kinds": "bilevel.engines",
    "register": "bilevel.engines",
    "compile_spec": "bilevel.compile",
    "Plan": "bilevel.planner",
    "ProblemFacts": "bilevel.planner",
    "make_plan": "bilevel.planner",
    "Problem": "bilevel.problem",
    "VariableView": "bilevel.problem",
    "DivergenceError": "bilevel.runtime.loop",
    "RunResult": "bilevel.runtime.loop",
    "hypergrad_at_init": "bilevel.runtime.loop",
    "run": "bilevel.runtime.loop",
    "BilevelSpec": "bilevel.spec",
    "LoadedSpec": "bilevel.spec",
    "SpecError": "bilevel.spec",
    "load_spec": "bilevel.spec",
    "spec_from_data": "bilevel.spec",
}
"""Where each name of the public API lives: imported on first use (PEP 562), so that ``import
bilevel`` (and the command line's start) does not import torch until something needs it."""


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bilevel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
