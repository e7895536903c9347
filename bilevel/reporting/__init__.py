"""`bilevel report` and the Python tables of runs.

For the runs given (run directories, directories of run directories such as a sweep's, glob
patterns), ``write_report`` writes into the output directory: ``metrics.png``,
``hyperparameters.png`` and ``monitor.png`` (bilevel.reporting.plots), ``report.md`` (the runs,
their report values, the spec fields and sweep parameters that differ, mean +- std and 95%
confidence intervals across seeds, instances and trials, the figures), ``report.json`` (the same
rows) and, with ``csv=True``, ``runs.csv``, ``instances.csv`` (for batches of instances),
``metrics.csv`` and ``aggregate.csv``. ``load_runs``, ``load_metrics`` and ``aggregate_runs``
give the same tables as pandas DataFrames (the ``pandas`` extra)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.reporting.aggregate import aggregate_rows
from bilevel.reporting.frames import aggregate_runs, load_metrics, load_runs
from bilevel.reporting.numbers import format_number
from bilevel.reporting.optimum import known_optimum, optimum_line
from bilevel.reporting.plots import draw_figures
from bilevel.reporting.runs import ReportError, RunRecord, expand_run_paths, read_run, read_runs
from bilevel.reporting.summary import summary_markdown
from bilevel.reporting.table import metric_rows, run_rows

__all__ = [
    "ReportError",
    "ReportFiles",
    "RunRecord",
    "aggregate_runs",
    "default_report_dir",
    "expand_run_paths",
    "format_number",
    "known_optimum",
    "load_metrics",
    "load_runs",
    "optimum_line",
    "read_run",
    "read_runs",
    "write_csv",
    "write_report",
]


@dataclass(frozen=True)
class ReportFiles:
    """What write_report wrote."""

    directory: Path
    summary: Path
    plots: tuple[Path, ...]
    tables: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()
    """What the report left out: lines of metrics.jsonl that are not records, per run."""


def default_report_dir(paths: Sequence[str | Path]) -> Path:
    """RUN_DIR/report for one run; <common parent of the runs>/report for several."""
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) == 1:
        return resolved[0] / "report"
    common = Path(*_common_parts([p.parent.parts for p in resolved])) if resolved else Path.cwd()
    return common / "report"


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    out: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return tuple(out) or ("/",)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``rows`` as a CSV file: a header of every column in first-seen order, empty cells for
    missing values, floats at full precision."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in columns})
    return path


def write_report(paths: str | Path | Sequence[str | Path], out: str | Path | None = None, csv: bool = False) -> ReportFiles:
    """Figures, report.md, report.json (and with ``csv`` the CSV tables) for the runs ``paths``
    names, written into ``out`` (default: default_report_dir of the run directories)."""
    runs = read_runs(paths)
    directory = Path(out) if out is not None else default_report_dir([run.path for run in runs])
    directory.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(runs, directory)
    rows = run_rows(runs)
    instance_rows = run_rows(runs, instances=True) if any((run.result or {}).get("instances") for run in runs) else []
    aggregates = aggregate_rows(instance_rows or rows)
    summary = directory / "report.md"
    summary.write_text(summary_markdown(rows, aggregates, figures, instance_rows))
    report_json = {"runs": rows, "aggregate": aggregates, "figures": [f.name for f in figures]}
    if instance_rows:
        report_json["instances"] = instance_rows
    (directory / "report.json").write_text(json.dumps(report_json, indent=2) + "\n")
    tables: list[Path] = []
    if csv:
        tables.append(write_csv(rows, directory / "runs.csv"))
        if instance_rows:
            tables.append(write_csv(instance_rows, directory / "instances.csv"))
        tables.append(write_csv(metric_rows(runs), directory / "metrics.csv"))
        tables.append(write_csv(aggregates, directory / "aggregate.csv"))
    notes = tuple(f"{run.path / 'metrics.jsonl'}: {len(run.skipped)} line(s) are not metrics records and were skipped"
                  f" (line {', '.join(map(str, run.skipped[:5]))}{', ...' if len(run.skipped) > 5 else ''})"
                  for run in runs if run.skipped)
    return ReportFiles(directory, summary, tuple(directory / f.name for f in figures), tuple(tables), notes)
