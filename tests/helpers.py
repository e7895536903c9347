"""Helpers shared by several test modules (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bilevel.fastpath import ReplayBackend, set_graph_backend

__all__ = ["hypergrad_calls", "replayed"]


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


@contextmanager
def replayed() -> Iterator[None]:
    """Every call replayed from a captured graph (the replay backend keeps a CUDA graph's contract, on CPU)."""
    set_graph_backend(ReplayBackend, capture_at_sighting=1)
    try:
        yield
    finally:
        set_graph_backend(None)
