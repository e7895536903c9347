"""Runs as pandas DataFrames: ``bilevel.load_runs``, ``bilevel.load_metrics``,
``bilevel.aggregate_runs``.

    runs = bilevel.load_runs("runs/sweeps/l2")                 # one row per trial, param.* columns
    steps = bilevel.load_metrics(["runs/a", "runs/b"])         # one row per logged step
    table = bilevel.aggregate_runs("runs/seeds-*")             # mean, std, 95% CI across seeds

The columns are those of bilevel.reporting.table (runs, metrics) and
bilevel.reporting.aggregate; ``bilevel report --csv`` writes the same tables as CSV files.

pandas is an optional dependency (the ``pandas`` extra, also in ``dev``): a run, a report and
its CSV files need none of it, and it is a large package that a training job on a cluster node
should not have to install. These three functions import it when called and say which extra to
install when it is missing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bilevel.reporting.aggregate import aggregate_rows
from bilevel.reporting.runs import read_runs
from bilevel.reporting.table import metric_rows, run_rows

__all__ = ["aggregate_runs", "load_metrics", "load_runs"]

Paths = str | Path | Sequence[str | Path]


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(f"bilevel.load_runs, load_metrics and aggregate_runs need pandas: pip install 'bilevel[pandas]'"
                          f" (or read the CSV files of `bilevel report --csv`); import failed: {exc}") from None
    return pandas


def _frame(rows: list[dict[str, Any]]) -> Any:
    pandas = _pandas()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pandas.DataFrame.from_records(rows, columns=columns)


def load_runs(paths: Paths, instances: bool = False) -> Any:
    """One row per run (``instances=True``: per instance of a batch of instances) of the run
    directories ``paths`` names: run directories, directories of run directories (a sweep's),
    glob patterns (bilevel.reporting.runs.expand_run_paths). ReportError for a path that is no
    run directory."""
    return _frame(run_rows(read_runs(paths), instances=instances))


def load_metrics(paths: Paths) -> Any:
    """One row per logged outer step of each run: ``run``, ``step``, ``elapsed_s``,
    ``upper_loss``, ``hypergrad_norm``, residuals, ``upper/<name>``, ``monitor/<name>``, ..."""
    return _frame(metric_rows(read_runs(paths)))


def aggregate_runs(paths: Paths) -> Any:
    """Mean, std and 95% confidence interval of each figure per configuration, across seeds,
    the instances of a batch and sweep trials with the same parameters (bilevel.reporting.aggregate)."""
    return _frame(aggregate_rows(run_rows(read_runs(paths), instances=True)))
