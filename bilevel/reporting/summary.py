"""report.md: the runs side by side, as tables of their flat rows (bilevel.reporting.table) and
their aggregates across replicates (bilevel.reporting.aggregate), then the figures.

Numbers are written by bilevel.reporting.numbers.format_number, as everywhere a person reads them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bilevel.reporting.aggregate import configuration_columns, figure_columns
from bilevel.reporting.numbers import format_number
from bilevel.reporting.plots import FigureFile

__all__ = ["RUN_COLUMNS", "summary_markdown"]

RUN_COLUMNS = (("run", "run"), ("engine", "engine"), ("status", "status"), ("steps", "steps"),
               ("processes", "processes"), ("final upper loss", "final_upper_loss"),
               ("best logged upper loss", "best_logged_upper_loss"), ("last hypergrad norm", "last_hypergrad_norm"),
               ("wall time (s)", "wall_time_s"), ("device", "device"), ("threads", "threads"))
"""(header, row key) of the table of runs."""


def _cell(value: Any) -> str:
    text = format_number(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _columns(rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row if k.startswith(prefix)))


def _optimum(row: dict[str, Any]) -> str:
    reached = row.get("known_optimum.reached")
    if reached is None:
        return "-"
    return f"{'reached' if reached else 'not reached'} (error {format_number(row.get('known_optimum.error'))})"


def _interval(item: dict[str, Any], figure: str) -> str:
    low, high = item.get(f"{figure}.ci95_low"), item.get(f"{figure}.ci95_high")
    return "-" if low is None else f"[{format_number(low)}, {format_number(high)}]"


def summary_markdown(rows: Sequence[dict[str, Any]], aggregates: Sequence[dict[str, Any]],
                     figures: Sequence[FigureFile], instance_rows: Sequence[dict[str, Any]] = ()) -> str:
    """The report: the runs, their report values, the spec fields that differ, the sweep
    parameters, the aggregates across replicates (when a configuration has several), the figures."""
    lines = ["# Run report", "", f"{len(rows)} run(s), written by `bilevel report`.", ""]
    lines += _table([c for c, _ in RUN_COLUMNS], [[_cell(row.get(key)) for _, key in RUN_COLUMNS] for row in rows])
    report_keys = _columns(rows, "report.")
    optimum = any(row.get("known_optimum.reached") is not None for row in rows)
    if report_keys or optimum:
        lines += ["", "## Report values", "", "From each run's report function (result.json \"report\").", ""]
        header = ["run", *(k.removeprefix("report.") for k in report_keys)] + (["known optimum"] if optimum else [])
        lines += _table(header, [[row["run"], *(_cell(row.get(k)) for k in report_keys)] + ([_optimum(row)] if optimum else [])
                                 for row in rows])
    spec_keys = _columns(rows, "spec.")
    if spec_keys:
        lines += ["", "## Spec fields that differ", ""]
        lines += _table(["run", *(k.removeprefix("spec.") for k in spec_keys)],
                        [[row["run"], *(_cell(row.get(k)) for k in spec_keys)] for row in rows])
    trials = [row for row in rows if row.get("trial") is not None]
    if trials:
        params = _columns(trials, "param.")
        lines += ["", "## Sweep parameters", ""]
        lines += _table(["run", "study", "trial", *(p.removeprefix("param.") for p in params)],
                        [[row["run"], _cell(row.get("study")), _cell(row.get("trial")), *(_cell(row.get(p)) for p in params)]
                         for row in trials])
    if any(item["n"] > 1 for item in aggregates):
        source = instance_rows or rows
        config = [c for c in configuration_columns(source) if len({repr(i.get(c)) for i in aggregates}) > 1] or ["engine"]
        lines += ["", "## Across seeds, instances and trials", "",
                  "Runs (instances of a batch, sweep trials) that differ only in their seeds form one configuration;"
                  " mean, sample standard deviation and the 95% confidence interval of the mean (Student's t) over them.", ""]
        table = []
        for item in aggregates:
            for figure in figure_columns(source):
                if item.get(f"{figure}.mean") is None:
                    continue
                table.append([*(_cell(item.get(c)) for c in config), str(item["n"]), figure,
                              _cell(item.get(f"{figure}.mean")), _cell(item.get(f"{figure}.std")), _interval(item, figure)])
        header = [c.removeprefix("spec.").removeprefix("param.") for c in config]
        lines += _table([*header, "n", "figure", "mean", "std", "95% CI"], table)
    if figures:
        lines += ["", "## Figures", ""]
        for figure in figures:
            lines += [f"### {figure.title}", "", f"![{figure.title}]({figure.name})", ""]
    return "\n".join(lines).rstrip() + "\n"
