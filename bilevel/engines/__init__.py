"""Hypergradient engines. Importing this package registers the built-in engines and those that
installed packages declare in the entry-point group ``bilevel.engines``.

Each engine is one module: its Config (the spec's ``engine:`` options), its State, its
algorithm and how it configures itself for a problem, registered with
``bilevel.engines.registry.register`` (docs/howto/new-engine.md)."""

from __future__ import annotations

from bilevel.engines.base import EAGER, Capabilities, Engine, EngineBase, EngineState, Execution, Hypergrad, Proposal, Stats
from bilevel.engines.bo_rep import BORepConfig, BORepEngine, BORepState
from bilevel.engines.bsvrb import BSVRBConfig, BSVRBEngine, BSVRBState
from bilevel.engines.darts import DartsConfig, DartsEngine, DartsState
from bilevel.engines.forward import ForwardConfig, ForwardEngine, ForwardState
from bilevel.engines.implicit import ImplicitConfig, ImplicitEngine, ImplicitState
from bilevel.engines.lv_hba import LVHBAConfig, LVHBAEngine, LVHBAState
from bilevel.engines.penalty import PenaltyConfig, PenaltyEngine, PenaltyState
from bilevel.engines.qp import QPConfig, QPEngine, QPState
from bilevel.engines.rarts import RartsConfig, RartsEngine, RartsState
from bilevel.engines.registry import (
    build_engine,
    engine_capabilities,
    engine_class,
    engine_config,
    engine_kinds,
    engines_by_priority,
    load_entry_points,
    register,
    unregister,
)
from bilevel.engines.stn import StnConfig, StnEngine, StnState
from bilevel.engines.unrolled import UnrolledConfig, UnrolledEngine
from bilevel.engines.zero_order import ZeroOrderConfig, ZeroOrderEngine
from bilevel.spec.engine import AutoEngine, EngineConfig, LinearSolverSpec

load_entry_points()

__all__ = [
    "EAGER",
    "AutoEngine",
    "BORepConfig",
    "BORepEngine",
    "BORepState",
    "BSVRBConfig",
    "BSVRBEngine",
    "BSVRBState",
    "Capabilities",
    "DartsConfig",
    "DartsEngine",
    "DartsState",
    "Engine",
    "EngineBase",
    "EngineConfig",
    "EngineState",
    "Execution",
    "ForwardConfig",
    "ForwardEngine",
    "ForwardState",
    "Hypergrad",
    "ImplicitConfig",
    "ImplicitEngine",
    "ImplicitState",
    "LVHBAConfig",
    "LVHBAEngine",
    "LVHBAState",
    "LinearSolverSpec",
    "PenaltyConfig",
    "PenaltyEngine",
    "PenaltyState",
    "QPConfig",
    "QPEngine",
    "QPState",
    "Proposal",
    "RartsConfig",
    "RartsEngine",
    "RartsState",
    "Stats",
    "StnConfig",
    "StnEngine",
    "StnState",
    "UnrolledConfig",
    "UnrolledEngine",
    "ZeroOrderConfig",
    "ZeroOrderEngine",
    "build_engine",
    "engine_capabilities",
    "engine_class",
    "engine_config",
    "engine_kinds",
    "engines_by_priority",
    "load_entry_points",
    "register",
    "unregister",
]
