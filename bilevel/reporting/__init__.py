"""`bilevel report`: plots and a markdown summary comparing run directories.

For the runs given, writes into the output directory: one PNG per metric overlaying the runs
(upper loss, hypergradient norm, inner residual, linear-solve residual when an engine reports
one), one PNG per tracked upper variable (hyperparameter trajectories, metrics.jsonl "upper") and
per monitor value ("monitor"), ``report.md`` (a table of the runs: engine, status, steps, final
upper loss, wall time, the problem's report values, sweep parameters; then the plots) and
``report.json`` (the table's rows)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bilevel.reporting.plots import SERIES, plot_nested, plot_series, safe_name
from bilevel.reporting.runs import ReportError, RunRecord, load_run, load_runs
from bilevel.reporting.summary import summary_markdown, summary_rows

__all__ = ["ReportError", "ReportFiles", "RunRecord", "default_report_dir", "load_run", "load_runs", "write_report"]


@dataclass(frozen=True)
class ReportFiles:
    """What write_report wrote."""

    directory: Path
    summary: Path
    plots: tuple[Path, ...]


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


def write_report(paths: Sequence[str | Path], out: str | Path | None = None) -> ReportFiles:
    """Plots and summary for the run directories ``paths``, written into ``out``."""
    runs = load_runs(paths)
    directory = Path(out) if out is not None else default_report_dir(paths)
    directory.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str]] = []
    for key, (title, log) in SERIES.items():
        name = f"{key}.png"
        if plot_series(runs, key, directory / name, title, log):
            plots.append((title, name))
    for group, prefix in (("upper", "upper"), ("monitor", "monitor")):
        names = list(dict.fromkeys(n for run in runs for n in run.nested_names(group)))
        for variable in names:
            name = f"{prefix}_{safe_name(variable)}.png"
            if plot_nested(runs, group, variable, directory / name):
                plots.append((f"{'upper variable' if group == 'upper' else 'monitor'}: {variable}", name))
    rows = summary_rows(runs)
    summary = directory / "report.md"
    summary.write_text(summary_markdown(rows, plots))
    (directory / "report.json").write_text(json.dumps({"runs": rows, "plots": [n for _, n in plots]}, indent=2) + "\n")
    return ReportFiles(directory, summary, tuple(directory / n for _, n in plots))
