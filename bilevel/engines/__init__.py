"""Hypergradient engines. Importing this package registers the built-in engines."""

from __future__ import annotations

from bilevel.engines.base import Capabilities, Engine, EngineState, Hypergrad, Stats
from bilevel.engines.implicit import ImplicitEngine
from bilevel.engines.registry import build_engine, engine_capabilities, engine_kinds, register
from bilevel.engines.unrolled import UnrolledEngine

__all__ = [
    "Capabilities",
    "Engine",
    "EngineState",
    "Hypergrad",
    "ImplicitEngine",
    "Stats",
    "UnrolledEngine",
    "build_engine",
    "engine_capabilities",
    "engine_kinds",
    "register",
]
