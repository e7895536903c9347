"""Runs as flat rows: one per run (or per instance of a batch of instances), one per logged step.

These rows are what ``bilevel report --csv`` writes, what ``bilevel.load_runs`` and
``bilevel.load_metrics`` turn into DataFrames, and what the aggregates across seeds are computed
from (bilevel.reporting.aggregate). Columns of a run row:

- ``run``, ``path``, ``name``, ``engine``, ``status``, ``steps``, ``processes``, ``device``,
  ``threads``, ``seed`` (run.seed), ``final_upper_loss``, ``best_logged_upper_loss``,
  ``last_hypergrad_norm``, ``wall_time_s``;
- ``report.<key>`` for each number or string of the problem's report, and
  ``known_optimum.reached`` / ``known_optimum.error`` when it states a known optimum;
- for sweep trials, ``study``, ``trial`` and ``param.<name>`` per sampled parameter;
- ``spec.<dotted.path>`` for every spec field whose value differs between the runs read together
  (from result.json's ``resolved_spec``), except the bookkeeping fields (``run.out``, how often
  to log, checkpoint and monitor, TensorBoard, data-parallel settings) and the fields a sweep
  parameter sets (its ``param.`` column shows them);
- with ``instances=True``, a run with a batch of instances gives one row per instance, with
  ``instance`` (its index), its own ``final_upper_loss`` and ``report.<key>``, and
  ``spec.<path>`` for each value its ``instances.vary`` sets.

A metrics row holds ``run``, ``step`` and the record's numbers named as TensorBoard names them
(``upper_loss``, ``upper/lam``, ``upper/lam/3``, ``monitor/test_accuracy``, ...)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from bilevel.reporting.optimum import KNOWN_OPTIMUM
from bilevel.reporting.runs import RunRecord
from bilevel.runtime.record_numbers import flat_params, record_values

__all__ = ["BOOKKEEPING_FIELDS", "is_replicate_column", "metric_rows", "run_rows", "varied_fields"]

BOOKKEEPING_FIELDS = ("run.out", "run.checkpoint_every", "run.log_every", "run.monitor_every", "run.tensorboard",
                      "run.distributed", "run.seed")
"""Spec fields (and prefixes) that never make two runs different configurations: where results
go, how often they are written, and the seed, which has its own column."""


def is_replicate_column(column: str) -> bool:
    """Whether a column indexes replicates rather than configurations: the run's seed, a spec
    field or sweep parameter named ``seed`` or ``*_seed`` (a data split's seed, an instance's)."""
    last = column.rsplit(".", 1)[-1]
    return column == "seed" or last == "seed" or last.endswith("_seed")


def _within(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _flat_spec(run: RunRecord) -> dict[str, Any] | None:
    spec = (run.result or {}).get("resolved_spec")
    return flat_params(spec) if isinstance(spec, Mapping) else None


def varied_fields(runs: Sequence[RunRecord]) -> list[str]:
    """The spec fields (dotted) whose values differ between ``runs`` (those whose result.json has
    a resolved spec), bookkeeping fields and sweep-parameter fields left out; where a section's
    ``kind`` differs, its kind only, not the settings of each kind (and for the engine not even
    that: the ``engine`` column says which engine ran)."""
    specs = [flat for flat in (_flat_spec(run) for run in runs) if flat is not None]
    if len(specs) < 2:
        return []
    swept = sorted({path for run in runs for path in ((run.trial or {}).get("paths") or {}).values()})
    keys = list(dict.fromkeys(key for flat in specs for key in flat))
    differs = [key for key in keys if not (_within(key, BOOKKEEPING_FIELDS) or _within(key, swept))
               and len({json.dumps(flat.get(key), sort_keys=True) for flat in specs}) > 1]
    # a section whose kind differs (engine.kind: implicit vs unrolled) shows its kind, not the
    # settings that only one of the kinds has
    switched = [key.removesuffix(".kind") for key in differs if key.endswith(".kind") or key == "kind"]
    kept = [key for key in differs if key.endswith(".kind") or not _within(key, [s for s in switched if s != "kind"])]
    return [key for key in kept if key != "engine.kind"]  # the engine column says which engine ran


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _report_columns(report: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in report.items():
        if key == KNOWN_OPTIMUM and isinstance(value, Mapping):
            out["known_optimum.reached"] = value.get("reached")
            out["known_optimum.error"] = value.get("error")
        elif _scalar(value):
            out[f"report.{key}"] = value
    return out


def _run_row(run: RunRecord, varied: Sequence[str]) -> dict[str, Any]:
    result = run.result or {}
    _, losses = run.series("upper_loss")
    _, norms = run.series("hypergrad_norm")
    spec = _flat_spec(run) or {}
    row: dict[str, Any] = {
        "run": run.label,
        "path": str(run.path),
        "name": result.get("name"),
        "engine": result.get("engine"),
        "status": run.status,
        "steps": result.get("steps", run.records[-1]["step"] if run.records else 0),
        "processes": result.get("world_size", 1) if result else None,
        "device": result.get("device"),
        "threads": result.get("threads"),
        "seed": spec.get("run.seed"),
        "final_upper_loss": result.get("final_upper_loss"),
        "best_logged_upper_loss": min(losses) if losses else None,
        "last_hypergrad_norm": norms[-1] if norms else None,
        "wall_time_s": result.get("wall_time_s"),
    }
    row.update(_report_columns(result.get("report") or {}))
    if run.trial:
        row["study"] = run.trial.get("study")
        row["trial"] = run.trial.get("number")
        for name, value in (run.trial.get("params") or {}).items():
            row[f"param.{name}"] = value
    for key in varied:
        value = spec.get(key)
        row[f"spec.{key}"] = value if _scalar(value) else json.dumps(value)
    return row


def run_rows(runs: Sequence[RunRecord], instances: bool = False) -> list[dict[str, Any]]:
    """One flat row per run, or with ``instances`` one per instance of a batch (module docstring)."""
    varied = varied_fields(runs)
    rows = []
    for run in runs:
        row = _run_row(run, varied)
        members = (run.result or {}).get("instances") if instances else None
        if not members:
            rows.append(row)
            continue
        base = {k: v for k, v in row.items() if not k.startswith(("report.", "known_optimum."))}
        for member in members:
            item = {**base, "instance": member.get("index"), "final_upper_loss": member.get("final_upper_loss"),
                    "best_logged_upper_loss": None, "last_hypergrad_norm": None}
            for path, value in (member.get("vary") or {}).items():
                item[f"spec.{path}"] = value if _scalar(value) else json.dumps(value)
            item.update(_report_columns(member.get("report") or {}))
            rows.append(item)
    return rows


def metric_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One flat row per logged step of each run (module docstring)."""
    rows = []
    for run in runs:
        for record in run.records:
            row: dict[str, Any] = {"run": run.label, "step": record["step"]}
            row.update(dict(record_values(record)))
            rows.append({k: v for k, v in row.items() if not isinstance(v, list)})  # long vectors: metrics.jsonl
    return rows
