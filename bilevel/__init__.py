"""bilevel: declarative bilevel and meta-optimization for PyTorch.

Declare an upper and a lower problem as a spec (Python or YAML/JSON); the planner picks a
hypergradient engine and says why; the runtime runs the outer loop and writes readable results."""

from __future__ import annotations

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
