"""More than two levels: chains top -> middle ... -> bottom, solved level by level.

``compile_spec`` turns a spec whose levels form a chain of three or more into a
:class:`ChainProblem`; the planner picks one of the multilevel engines registered here (nested
implicit differentiation or nested unrolling) and the runtime runs it like a two-level engine.
See docs/howto/multilevel.md for the math, the spec and the cost."""

from __future__ import annotations

from bilevel.multilevel.solution import SolveLog, argmin
from bilevel.multilevel.chain import ChainProblem, merge_levels
from bilevel.multilevel.implicit import ChainImplicitEngine, reduced_objective
from bilevel.multilevel.registry import (
    build_chain_engine,
    chain_engine_capabilities,
    chain_engine_class,
    chain_engine_kinds,
    register_chain_engine,
)
from bilevel.multilevel.unrolled import ChainUnrolledEngine

__all__ = [
    "ChainImplicitEngine",
    "ChainProblem",
    "ChainUnrolledEngine",
    "SolveLog",
    "argmin",
    "build_chain_engine",
    "chain_engine_capabilities",
    "chain_engine_class",
    "chain_engine_kinds",
    "merge_levels",
    "reduced_objective",
    "register_chain_engine",
]
