"""bilevel: declarative bilevel and meta-optimization for PyTorch.

Declare an upper and a lower problem as a spec (Python or YAML/JSON); the planner picks a
hypergradient engine and says why; the runtime runs the outer loop and writes readable results."""

from __future__ import annotations

from bilevel.compile import compile_spec
from bilevel.engines import Capabilities, EngineState, Hypergrad, Stats, build_engine, engine_capabilities, engine_kinds
from bilevel.problem import Problem, VariableView
from bilevel.spec import BilevelSpec, LoadedSpec, SpecError, load_spec, spec_from_data

__version__ = "0.1.0"

__all__ = [
    "BilevelSpec",
    "Capabilities",
    "EngineState",
    "Hypergrad",
    "LoadedSpec",
    "Problem",
    "SpecError",
    "Stats",
    "VariableView",
    "build_engine",
    "compile_spec",
    "engine_capabilities",
    "engine_kinds",
    "load_spec",
    "spec_from_data",
]
