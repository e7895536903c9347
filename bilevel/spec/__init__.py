"""Pydantic v2 models of a bilevel problem spec, their loading from YAML/JSON, and the JSON Schema."""

from __future__ import annotations

from bilevel.spec.constraints import BoxSet, ConstraintSpec, SimplexSet, VariableSet
from bilevel.spec.engine import (
    AutoEngine,
    BORepConfig,
    EngineSpec,
    ImplicitConfig,
    LinearSolverSpec,
    LVHBAConfig,
    PenaltyConfig,
    UnrolledConfig,
)
from bilevel.spec.errors import SpecError, SpecIssue
from bilevel.spec.fastpath import FastPathMode, PrecisionSpec
from bilevel.spec.instances import InstancesSpec
from bilevel.spec.level import (
    Assumptions,
    DataSpec,
    LevelSpec,
    ModuleVariable,
    OptimizerSpec,
    TensorVariable,
    Variable,
)
from bilevel.spec.load import LoadedSpec, apply_overrides, load_spec, spec_from_data
from bilevel.spec.problem import BilevelSpec, level_graph
from bilevel.spec.run import BudgetSpec, RunSpec
from bilevel.spec.schema import spec_schema

__all__ = [
    "Assumptions",
    "AutoEngine",
    "BORepConfig",
    "BilevelSpec",
    "BoxSet",
    "BudgetSpec",
    "ConstraintSpec",
    "DataSpec",
    "FastPathMode",
    "EngineSpec",
    "ImplicitConfig",
    "InstancesSpec",
    "LVHBAConfig",
    "LevelSpec",
    "LinearSolverSpec",
    "LoadedSpec",
    "ModuleVariable",
    "OptimizerSpec",
    "PrecisionSpec",
    "PenaltyConfig",
    "RunSpec",
    "SimplexSet",
    "SpecError",
    "SpecIssue",
    "TensorVariable",
    "UnrolledConfig",
    "Variable",
    "VariableSet",
    "apply_overrides",
    "level_graph",
    "load_spec",
    "spec_from_data",
    "spec_schema",
]
