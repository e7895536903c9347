"""Pydantic v2 models of a bilevel problem spec, their loading from YAML/JSON, and the JSON Schema."""

from __future__ import annotations

from bilevel.spec.constraints import BoxSet, ConstraintSpec, SimplexSet, VariableSet
from bilevel.spec.engine import (
    AutoEngine,
    BORepConfig,
    DartsConfig,
    EngineSpec,
    ImplicitConfig,
    LinearSolverSpec,
    LVHBAConfig,
    PenaltyConfig,
    RartsConfig,
    StnConfig,
    UnrolledConfig,
)
from bilevel.spec.errors import SpecError, SpecIssue, VariableError
from bilevel.spec.fastpath import FastPathMode, PrecisionSpec
from bilevel.spec.hyperparameter import HyperparameterVariable
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
from bilevel.spec.run import BudgetSpec, DistributedSpec, RunSpec
from bilevel.spec.search_space import (
    ArchitectureVariable,
    CellSpec,
    ConvSearchSpace,
    MLPSearchSpace,
    MacroSearchSpace,
    RetrainSpec,
    SearchSpace,
    SupernetVariable,
)
from bilevel.spec.schema import spec_schema

__all__ = [
    "ArchitectureVariable",
    "Assumptions",
    "AutoEngine",
    "BORepConfig",
    "BilevelSpec",
    "BoxSet",
    "BudgetSpec",
    "CellSpec",
    "ConstraintSpec",
    "ConvSearchSpace",
    "DartsConfig",
    "DataSpec",
    "DistributedSpec",
    "FastPathMode",
    "EngineSpec",
    "HyperparameterVariable",
    "ImplicitConfig",
    "InstancesSpec",
    "LVHBAConfig",
    "LevelSpec",
    "LinearSolverSpec",
    "LoadedSpec",
    "MLPSearchSpace",
    "MacroSearchSpace",
    "ModuleVariable",
    "OptimizerSpec",
    "PrecisionSpec",
    "PenaltyConfig",
    "RartsConfig",
    "RetrainSpec",
    "RunSpec",
    "SearchSpace",
    "SimplexSet",
    "SpecError",
    "SpecIssue",
    "StnConfig",
    "SupernetVariable",
    "TensorVariable",
    "UnrolledConfig",
    "Variable",
    "VariableError",
    "VariableSet",
    "apply_overrides",
    "level_graph",
    "load_spec",
    "spec_from_data",
    "spec_schema",
]
