"""Whether a run reached the known optimum of its problem.

A toy problem whose solution is known (LV-HBA's coupled-constraint toy, V-PBGD's nonconvex toy,
the three-level quadratic) says so in its report function: ``report["known_optimum"] =
known_optimum(...)``, a mapping with what the optimum is, the run's error against it, the
tolerance and the verdict. ``bilevel run`` prints ``optimum_line`` of it, ``bilevel report``
and ``bilevel.load_runs`` show the verdict and the error beside the other report values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bilevel.reporting.numbers import format_number

__all__ = ["KNOWN_OPTIMUM", "batch_optimum_line", "known_optimum", "optimum_line"]

KNOWN_OPTIMUM = "known_optimum"
"""The report key under which a problem states its known optimum."""


def known_optimum(target: str, error: float, tolerance: float, measure: str) -> dict[str, Any]:
    """The report entry of a known optimum: ``target`` says what it is (``"x* = -0.3"``),
    ``error`` is the run's distance to it under ``measure`` (``"relative error ||x - x*|| /
    ||x*||"``), and the optimum counts as reached when ``error <= tolerance``."""
    error = float(error)
    return {"target": target, "measure": measure, "error": error, "tolerance": float(tolerance),
            "reached": bool(error <= tolerance)}


def optimum_line(report: Mapping[str, Any] | None) -> str | None:
    """``known optimum x* = -0.3: reached (relative error ... 0.00012 <= 0.01)``, or None when the
    report states no known optimum."""
    entry = (report or {}).get(KNOWN_OPTIMUM)
    if not isinstance(entry, Mapping) or "reached" not in entry:
        return None
    verdict, sign = ("reached", "<=") if entry["reached"] else ("not reached", ">")
    return (f"known optimum {entry.get('target', '')}: {verdict} ({entry.get('measure', 'error')}"
            f" {format_number(entry.get('error'))} {sign} {format_number(entry.get('tolerance'))})")


def batch_optimum_line(reports: list[Mapping[str, Any] | None]) -> str | None:
    """For a batch of instances: ``known optimum ...: reached in 1020 of 1024 instances (largest
    relative gap ... 3.1e-05)``, or None when no instance's report states a known optimum."""
    entries = [r[KNOWN_OPTIMUM] for r in reports if isinstance(r, Mapping) and isinstance(r.get(KNOWN_OPTIMUM), Mapping)]
    if not entries:
        return None
    reached = sum(bool(e.get("reached")) for e in entries)
    worst = max(float(e.get("error", 0.0)) for e in entries)
    first = entries[0]
    return (f"known optimum {first.get('target', '')}: reached in {reached} of {len(entries)} instances (largest"
            f" {first.get('measure', 'error')} {format_number(worst)}, tolerance {format_number(first.get('tolerance'))})")
