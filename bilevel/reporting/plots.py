"""The figures of `bilevel report`: a few multi-panel PNGs overlaying the runs (matplotlib's Agg
canvas: no display, no global backend change).

- ``metrics.png``: upper loss, hypergradient norm, inner residual and linear-solve residual
  (those the runs logged), against the outer step (top row) and the wall-clock time since the
  loop started (bottom row); norms and residuals on log axes when positive.
- ``hyperparameters.png``: one panel per tracked upper variable (metrics.jsonl ``upper``: the
  small tensors, in their declared units), on a log axis when the variable is a hyperparameter
  declared ``log: true`` (or, for plain tensors, when its positive values span more than two
  decades).
- ``monitor.png``: one panel per value the monitor logged, except those named as an upper
  variable (the same hyperparameter, seen one step later: plotted once, in hyperparameters.png).

One color per run, named in one legend per figure; a vector-valued trajectory draws one line per
entry (the first MAX_COMPONENTS) in its run's color."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.reporting.runs import RunRecord

__all__ = ["MAX_COMPONENTS", "SERIES", "FigureFile", "draw_figures", "log_scale_variables", "metrics_figure",
           "panel_names", "safe_name", "trajectories_figure"]

SERIES: dict[str, tuple[str, bool]] = {
    "upper_loss": ("upper loss F(x, y)", False),
    "hypergrad_norm": ("hypergradient norm ||dF/dx||", True),
    "inner_residual": ("inner residual ||grad_y G||", True),
    "linear_residual": ("linear-solve residual (relative)", True),
}
"""metrics.jsonl key -> (panel title, log axis when every value is positive)."""

MAX_COMPONENTS = 20
"""A vector-valued trajectory shows at most this many of its entries."""

PANEL = (4.2, 3.1)
"""Width and height of one panel (inches)."""


def safe_name(name: str) -> str:
    """A file-name-safe version of a metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "value"


@dataclass(frozen=True)
class FigureFile:
    """One figure written: its file name and what it shows."""

    name: str
    title: str


def _figure(panels: int, rows: int = 1) -> tuple[Any, list[list[Any]]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = panels if rows > 1 else min(panels, 3)
    grid_rows = rows if rows > 1 else math.ceil(panels / columns)
    figure = Figure(figsize=(PANEL[0] * columns, PANEL[1] * grid_rows + 0.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(grid_rows, columns, squeeze=False)
    return figure, [list(row) for row in axes]


def _colors(n: int) -> list[Any]:
    """n distinct colors: the default cycle up to 10 runs, tab20 up to 20, then viridis."""
    import matplotlib

    if n <= 10:
        return [f"C{i}" for i in range(10)]
    cmap = matplotlib.colormaps["tab20" if n <= 20 else "viridis"]
    return [cmap(i) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]


def _finish(figure: Any, axes: list[list[Any]], used: int, runs: Sequence[RunRecord], colors: list[Any]) -> Any:
    """Hide unused panels, one legend for the figure (runs by color), lay out; returns the figure."""
    from matplotlib.lines import Line2D

    flat = [ax for row in axes for ax in row]
    for ax in flat[used:]:
        ax.set_visible(False)
    for ax in flat[:used]:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=1.6) for i in range(len(runs))]
    columns = min(len(runs), 4)
    figure.legend(handles, [run.label for run in runs], loc="lower center", ncol=columns, fontsize=8, frameon=False)
    legend_rows = math.ceil(len(runs) / columns)
    figure.tight_layout(rect=(0, min(0.4, 0.05 + 0.045 * legend_rows), 1, 1))
    return figure


def _metric_panels(runs: Sequence[RunRecord]) -> list[str]:
    return [key for key in SERIES if any(run.series(key)[0] for run in runs)]


def _elapsed(run: RunRecord) -> dict[int, float]:
    return {int(r["step"]): float(r["elapsed_s"]) for r in run.records if isinstance(r.get("elapsed_s"), (int, float))}


def metrics_figure(runs: Sequence[RunRecord]) -> Any:
    """The figure of metrics.png (module docstring); None when no run logged any of the SERIES."""
    keys = _metric_panels(runs)
    if not keys:
        return None
    colors = _colors(len(runs))
    figure, axes = _figure(len(keys), rows=2)
    for column, key in enumerate(keys):
        title, log = SERIES[key]
        drawn: list[float] = []
        for index, run in enumerate(runs):
            steps, values = run.series(key)
            if not steps:
                continue
            color = colors[index % len(colors)]
            axes[0][column].plot(steps, values, color=color, linewidth=1.3)
            clock = _elapsed(run)
            timed = [(clock[s], v) for s, v in zip(steps, values) if s in clock]
            if timed:
                axes[1][column].plot([t for t, _ in timed], [v for _, v in timed], color=color, linewidth=1.3)
            drawn += values
        for row, xlabel in ((0, "outer step"), (1, "wall-clock time (s)")):
            ax = axes[row][column]
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=9)
            if log and drawn and min(drawn) > 0:
                ax.set_yscale("log")
    return _finish(figure, axes, 2 * len(keys), runs, colors)


def log_scale_variables(run: RunRecord) -> set[str]:
    """Names of the top level's variables declared as hyperparameters with ``log: true`` (from
    result.json's resolved spec)."""
    spec = (run.result or {}).get("resolved_spec") or {}
    levels = spec.get("levels") or {}
    top = [level for level in levels.values() if isinstance(level, Mapping) and not level.get("parent")]
    names = set()
    for level in top:
        for name, variable in (level.get("variables") or {}).items():
            if isinstance(variable, Mapping) and variable.get("kind") == "hyperparameter" and variable.get("log"):
                names.add(name)
    return names


def _spans_decades(values: list[list[float]]) -> bool:
    flat = [v for vector in values for v in vector]
    return bool(flat) and min(flat) > 0 and max(flat) / min(flat) > 100


def trajectories_figure(runs: Sequence[RunRecord], group: str, names: Sequence[str], log_names: set[str] = frozenset()) -> Any:
    """One panel per name of record[group] ("upper" or "monitor"), on a log axis for the names in
    ``log_names`` (and for upper variables spanning decades); None when ``names`` is empty."""
    if not names:
        return None
    colors = _colors(len(runs))
    figure, axes = _figure(len(names))
    flat = [ax for row in axes for ax in row]
    for ax, name in zip(flat, names):
        truncated, gathered = False, []
        for index, run in enumerate(runs):
            steps, vectors = run.nested(group, name)
            if not steps:
                continue
            width = min(len(v) for v in vectors)
            truncated |= width > MAX_COMPONENTS
            for component in range(min(width, MAX_COMPONENTS)):
                ax.plot(steps, [v[component] for v in vectors], color=colors[index % len(colors)],
                        alpha=1.0 if width == 1 else 0.6, linewidth=1.2)
            gathered += vectors
        log = name in log_names or (group == "upper" and _spans_decades(gathered))
        if log and gathered and min(v for vector in gathered for v in vector) > 0:
            ax.set_yscale("log")
        note = [f"first {MAX_COMPONENTS} entries"] if truncated else []
        note += ["log scale"] if ax.get_yscale() == "log" else []
        ax.set_title(name + (f" ({', '.join(note)})" if note else ""), fontsize=10)
        ax.set_xlabel("outer step", fontsize=9)
    return _finish(figure, axes, len(names), runs, colors)


def panel_names(runs: Sequence[RunRecord]) -> dict[str, list[str]]:
    """The panels of hyperparameters.png ("upper") and monitor.png ("monitor"): every tracked
    upper variable, and every monitor value not named as one."""
    upper = list(dict.fromkeys(n for run in runs for n in run.nested_names("upper")))
    monitored = [n for n in dict.fromkeys(n for run in runs for n in run.nested_names("monitor")) if n not in upper]
    return {"upper": upper, "monitor": monitored}


def draw_figures(runs: Sequence[RunRecord], directory: Path) -> list[FigureFile]:
    """Write metrics.png, hyperparameters.png and monitor.png (those with something to show)
    into ``directory``; returns what was written, in that order."""
    names = panel_names(runs)
    upper, monitored = names["upper"], names["monitor"]
    log_names = set().union(*(log_scale_variables(run) for run in runs)) if runs else set()
    planned = [
        (FigureFile("metrics.png", "upper loss, hypergradient norm and residuals, by outer step and wall-clock time"),
         lambda: metrics_figure(runs)),
        (FigureFile("hyperparameters.png", "upper variables (hyperparameters) by outer step"),
         lambda: trajectories_figure(runs, "upper", upper, log_names)),
        (FigureFile("monitor.png", "monitor values by outer step"), lambda: trajectories_figure(runs, "monitor", monitored)),
    ]
    written = []
    for file, make in planned:
        figure = make()
        if figure is not None:
            figure.savefig(directory / file.name, dpi=110)
            written.append(file)
    return written
