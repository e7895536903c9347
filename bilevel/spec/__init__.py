"""Pydantic v2 models of a bilevel problem spec, their loading from YAML/JSON, and the JSON Schema.

Each engine's options (``ImplicitConfig``, ...) live with the engine (``bilevel.engines``); the
spec's ``engine`` field accepts those of every registered engine."""

from __future__ import annotations

from bilevel.spec.constraints import BoxSet, ConstraintSpec, SimplexSet, VariableSet
from bilevel.spec.engine import AutoEngine, EngineConfig, LinearSolverSpec
from bilevel.spec.errors import SpecError, SpecIssue, SpecSource, VariableError
from bilevel.spec.fastpath import FastPathMode, PrecisionSpec
from bilevel.spec.hyperparameter import HyperparameterVariable
from bilevel.spec.blocks import BlocksSpec
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
from bilevel.spec.prox import CustomProx, ElasticNetProx, GroupLassoProx, L1Prox, ProxOperator
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
    "BilevelSpec",
    "BlocksSpec",
    "BoxSet",
    "BudgetSpec",
    "CellSpec",
    "ConstraintSpec",
    "ConvSearchSpace",
    "CustomProx",
    "DataSpec",
    "EngineConfig",
    "DistributedSpec",
    "ElasticNetProx",
    "FastPathMode",
    "GroupLassoProx",
    "HyperparameterVariable",
    "InstancesSpec",
    "L1Prox",
    "LevelSpec",
    "LinearSolverSpec",
    "LoadedSpec",
    "MLPSearchSpace",
    "MacroSearchSpace",
    "ModuleVariable",
    "OptimizerSpec",
    "PrecisionSpec",
    "ProxOperator",
    "RetrainSpec",
    "RunSpec",
    "SearchSpace",
    "SimplexSet",
    "SpecError",
    "SpecIssue",
    "SpecSource",
    "SupernetVariable",
    "TensorVariable",
    "Variable",
    "VariableError",
    "VariableSet",
    "apply_overrides",
    "level_graph",
    "load_spec",
    "spec_from_data",
    "spec_schema",
]
