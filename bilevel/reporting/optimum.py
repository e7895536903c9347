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

__all__ = ["KNOWN_OPTIMUM", "known_optimum", "optimum_line"]

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
