"""The outer loop and what it writes: metrics, checkpoints, results."""

from __future__ import annotations

from bilevel.runtime.loop import DivergenceError, RunResult, run

__all__ = ["DivergenceError", "RunResult", "run"]
