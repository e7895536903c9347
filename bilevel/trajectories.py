"""Hyperparameter trajectories: a monitor that logs the upper variables' values over a run, and a
plot of them from metrics.jsonl (the schedule an online method such as STN discovers).

    monitor: bilevel.trajectories:record_hyperparameters          # into metrics.jsonl, "monitor"
    report: my_problem.py:report    # calls plot_trajectories(out_dir) -> hyperparameters.png"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_trajectories", "plot_trajectories", "record_hyperparameters"]


def record_hyperparameters(upper: Any, lower: Any, *, step: int, out_dir: Path | None = None,
                           names: list[str] | None = None, max_numel: int = 16) -> dict[str, Any]:
    """The current values of the upper tensor variables (hyperparameters in their declared units):
    ``names`` (default: every tensor variable with at most ``max_numel`` entries). Numbers, lists of
    numbers, or the string of a categorical choice."""
    out: dict[str, Any] = {}
    for name in names if names is not None else list(upper):
        value = upper[name]
        if isinstance(value, torch.Tensor):
            if names is None and value.numel() > max_numel:
                continue
            value = value.detach().cpu().tolist()
        elif callable(value):  # a module variable
            continue
        out[name] = value
    return out


def load_trajectories(out_dir: str | Path) -> dict[str, tuple[list[int], list[Any]]]:
    """name -> (steps, values) of every monitored value in ``out_dir``/metrics.jsonl."""
    series: dict[str, tuple[list[int], list[Any]]] = {}
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return series
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for name, value in (record.get("monitor") or {}).items():
            steps, values = series.setdefault(name, ([], []))
            steps.append(int(record["step"]))
            values.append(value)
    return series


def plot_trajectories(out_dir: str | Path, names: list[str] | None = None, filename: str = "hyperparameters.png",
                      log_scale: tuple[str, ...] = ()) -> Path | None:
    """One panel per monitored value against the outer step (a vector: one line per entry; a
    categorical string: its choices on the y axis); written to ``out_dir``/``filename``. Returns
    the path, or None when nothing was monitored."""
    series = load_trajectories(out_dir)
    if names is not None:
        series = {n: series[n] for n in names if n in series}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(series))
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (name, (steps, values)) in zip(axes.flat, series.items()):
        if values and isinstance(values[0], str):
            labels = sorted(set(values))
            axis.step(steps, [labels.index(v) for v in values], where="post")
            axis.set_yticks(range(len(labels)), labels)
        elif values and isinstance(values[0], list):
            for entry, trace in enumerate(zip(*[_flat(v) for v in values])):
                axis.plot(steps, trace, label=f"{name}[{entry}]")
            if len(_flat(values[0])) <= 6:
                axis.legend(fontsize=7)
        else:
            axis.plot(steps, values)
        if name in log_scale:
            axis.set_yscale("log")
        axis.set_title(name)
        axis.set_xlabel("outer step")
    for axis in list(axes.flat)[len(series):]:
        axis.set_visible(False)
    figure.tight_layout()
    path = Path(out_dir) / filename
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _flat(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [item for part in value for item in _flat(part)]
    return [value]
