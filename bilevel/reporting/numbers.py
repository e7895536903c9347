"""How numbers are written in everything a person reads: command summaries, report.md, plot
labels. One rule, so that a residual of 1e-5 never shows as 0.0000 beside a 16-digit float.

``format_number``: integers as they are, floats with 6 significant digits (``0.250207``,
``9.67656e-05``, ``1e+06``), booleans as ``true`` / ``false``, None as ``-``. JSON outputs keep
full precision; only what is printed for reading goes through here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["format_mapping", "format_number"]


def format_number(value: Any, digits: int = 6) -> str:
    """``value`` as a person reads it (see the module docstring); other values as ``str``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    if value is None:
        return "-"
    return str(value)


def format_mapping(values: Mapping[str, Any], digits: int = 6, separator: str = "  ") -> str:
    """``key value`` pairs on one line: ``inner_residual 0.0489526  hvp_count 20``."""
    return separator.join(f"{key} {format_number(value, digits)}" for key, value in values.items())
