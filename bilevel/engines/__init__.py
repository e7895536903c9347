"""Hypergradient engines. Importing this package registers the built-in engines."""

from __future__ import annotations

from bilevel.engines.base import Capabilities, Engine, EngineBase, EngineState, Hypergrad, Stats
from bilevel.engines.bo_rep import BORepEngine
from bilevel.engines.darts import DartsEngine
from bilevel.engines.implicit import ImplicitEngine
from bilevel.engines.lv_hba import LVHBAEngine
from bilevel.engines.penalty import PenaltyEngine
from bilevel.engines.rarts import RartsEngine
from bilevel.engines.registry import build_engine, engine_capabilities, engine_kinds, register
from bilevel.engines.stn import StnEngine
from bilevel.engines.unrolled import UnrolledEngine

__all__ = [
    "BORepEngine",
    "Capabilities",
    "DartsEngine",
    "Engine",
    "EngineBase",
    "EngineState",
    "Hypergrad",
    "ImplicitEngine",
    "LVHBAEngine",
    "PenaltyEngine",
    "RartsEngine",
    "Stats",
    "StnEngine",
    "UnrolledEngine",
    "build_engine",
    "engine_capabilities",
    "engine_kinds",
    "register",
]
