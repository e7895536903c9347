"""Helpers shared by several test modules (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

from typing import Any

__all__ = ["hypergrad_calls"]


def hypergrad_calls(engine: Any, problem: Any, n: int) -> list[Any]:
    """n successive hypergradients at the initial upper variables, each warm-started from the
    previous call's state."""
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    out = []
    for _ in range(n):
        result = engine.hypergrad(problem, x, state, problem.upper.batch())
        state = result.state
        out.append(result)
    return out
