"""The markdown summary comparing runs (and its JSON twin)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bilevel.reporting.runs import RunRecord

__all__ = ["summary_markdown", "summary_rows"]


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "–"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def summary_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One dict per run: what the summary table shows."""
    rows = []
    for run in runs:
        result = run.result or {}
        _, losses = run.series("upper_loss")
        _, norms = run.series("hypergrad_norm")
        steps = result.get("steps", run.records[-1]["step"] if run.records else 0)
        rows.append({
            "run": run.label,
            "path": str(run.path),
            "engine": result.get("engine"),
            "status": run.status,
            "steps": steps,
            "processes": result.get("world_size", 1) if result else None,
            "final_upper_loss": result.get("final_upper_loss"),
            "best_logged_upper_loss": min(losses) if losses else None,
            "last_hypergrad_norm": norms[-1] if norms else None,
            "wall_time_s": result.get("wall_time_s"),
            "device": result.get("device"),
            "report": {k: v for k, v in (result.get("report") or {}).items() if _is_scalar(v)},
            "trial": run.trial,
        })
    return rows


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def summary_markdown(rows: Sequence[dict[str, Any]], plots: Sequence[tuple[str, str]]) -> str:
    """The report: a table of the runs, their report values, sweep parameters, then the plots
    (``plots``: (title, file name) pairs)."""
    lines = ["# Run report", "", f"{len(rows)} run(s), written by `bilevel report`.", ""]
    columns = [("run", "run"), ("engine", "engine"), ("status", "status"), ("steps", "steps"),
               ("processes", "processes"), ("final upper loss", "final_upper_loss"),
               ("best logged upper loss", "best_logged_upper_loss"), ("last hypergrad norm", "last_hypergrad_norm"),
               ("wall time (s)", "wall_time_s"), ("device", "device")]
    lines += _table([c for c, _ in columns], [[_number(row[key]) for _, key in columns] for row in rows])
    report_keys = list(dict.fromkeys(k for row in rows for k in row["report"]))
    if report_keys:
        lines += ["", "## Report values", "", "From each run's report function (result.json \"report\").", ""]
        lines += _table(["run", *report_keys], [[row["run"], *(_number(row["report"].get(k)) for k in report_keys)] for row in rows])
    trials = [row for row in rows if row["trial"]]
    if trials:
        params = list(dict.fromkeys(k for row in trials for k in row["trial"].get("params", {})))
        lines += ["", "## Sweep parameters", ""]
        lines += _table(["run", "study", "trial", *params],
                        [[row["run"], _number(row["trial"].get("study")), _number(row["trial"].get("number")),
                          *(_number(row["trial"].get("params", {}).get(p)) for p in params)] for row in trials])
    if plots:
        lines += ["", "## Plots", ""]
        for title, name in plots:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"
