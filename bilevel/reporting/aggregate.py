"""Mean, standard deviation and 95% confidence interval of run figures across replicates.

Rows (bilevel.reporting.table: one per run, or per instance of a batch) are grouped by their
configuration: the problem's name, the engine, the steps, the sweep parameters and the spec
fields that differ between the runs, except those that index replicates (``seed``, a field or
parameter named ``seed`` or ``*_seed``: table.is_replicate_column). Runs that differ only in
their seeds, the instances of a batch over seeds, and sweep trials with the same parameters
thus form one group, and the group's row says, for each figure (final upper loss, best logged
upper loss, wall time, every number of the report, the error to a known optimum):

    mean,  std (sample standard deviation, n - 1),
    95% CI = mean +- t_{0.975, n-1} * std / sqrt(n)      (Student's t: the replicates' mean)

over the rows that have it, and for a known optimum the fraction of rows that reached it. A
group of one has no std or interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bilevel.reporting.table import is_replicate_column

__all__ = ["CONFIG_COLUMNS", "aggregate_rows", "configuration_columns", "figure_columns", "mean_std_ci"]

CONFIG_COLUMNS = ("name", "engine", "steps")
"""Columns of every run row that are part of its configuration."""

_FIGURES = ("final_upper_loss", "best_logged_upper_loss", "wall_time_s", "known_optimum.error")


def mean_std_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, sample std, half-width of the ``level`` confidence interval of the mean by
    Student's t); std and half-width are None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    from scipy.stats import t

    return mean, std, float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)


def configuration_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The columns that tell configurations apart: name, engine, steps, the ``param.`` and
    ``spec.`` columns that are not replicate indices."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [c for c in columns if (c in CONFIG_COLUMNS or c.startswith(("param.", "spec."))) and not is_replicate_column(c)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def figure_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The figures averaged: final and best logged upper loss, wall time, the report's numbers,
    the error to a known optimum (those that some row has as a number)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    wanted = [c for c in columns if c in _FIGURES or c.startswith("report.")]
    return [c for c in wanted if any(_is_number(row.get(c)) for row in rows)]


def aggregate_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration, in the order the configurations first appear (module
    docstring): the configuration's columns, ``n``, ``runs`` (the run labels, ``;``-separated),
    then per figure F: ``F.mean``, ``F.std``, ``F.ci95_low``, ``F.ci95_high``; and
    ``known_optimum.reached`` (the fraction of rows that reached it) when rows state one."""
    config = configuration_columns(rows)
    figures = figure_columns(rows)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row.get(c)) for c in config), []).append(row)
    out = []
    for members in groups.values():
        item: dict[str, Any] = {c: members[0].get(c) for c in config}
        item["n"] = len(members)
        item["runs"] = ";".join(dict.fromkeys(str(m.get("run")) for m in members))
        for figure in figures:
            values = [float(m[figure]) for m in members if _is_number(m.get(figure))]
            mean, std, half = mean_std_ci(values) if values else (None, None, None)
            item[f"{figure}.mean"] = mean
            item[f"{figure}.std"] = std
            item[f"{figure}.ci95_low"] = None if half is None else mean - half
            item[f"{figure}.ci95_high"] = None if half is None else mean + half
        reached = [bool(m["known_optimum.reached"]) for m in members if isinstance(m.get("known_optimum.reached"), bool)]
        if reached:
            item["known_optimum.reached"] = sum(reached) / len(reached)
        out.append(item)
    return out
