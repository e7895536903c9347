"""Reading run directories back: result.json, metrics.jsonl and, for sweep trials, trial.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bilevel.plain import flat_numbers

__all__ = ["ReportError", "RunRecord", "load_run", "load_runs"]


class ReportError(ValueError):
    """A directory given to the report is not a run directory (or cannot be read)."""


@dataclass
class RunRecord:
    """One run as the report sees it."""

    path: Path
    label: str
    result: dict[str, Any] | None
    """result.json (None for a run that has not finished: killed, or still running)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """metrics.jsonl, one dict per logged step (a torn last line is skipped)."""
    trial: dict[str, Any] | None = None
    """trial.json of a sweep trial: study, number and sampled parameters."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a top-level numeric metric, skipping records without it."""
        steps, values = [], []
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.append(int(record["step"]))
                values.append(float(value))
        return steps, values

    def nested(self, group: str, name: str) -> tuple[list[int], list[list[float]]]:
        """(steps, vectors) of record[group][name] ("upper" or "monitor"), each value as a flat list."""
        steps, values = [], []
        for record in self.records:
            value = (record.get(group) or {}).get(name)
            flat = flat_numbers(value)
            if flat is not None:
                steps.append(int(record["step"]))
                values.append(flat)
        return steps, values

    def nested_names(self, group: str) -> list[str]:
        names: dict[str, None] = {}
        for record in self.records:
            for name in record.get(group) or {}:
                names[name] = None
        return list(names)

    @property
    def status(self) -> str:
        if self.result is None:
            return "incomplete"
        return str(self.result.get("status", "completed"))



def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it ({exc})") from None


def load_run(path: str | Path, label: str | None = None) -> RunRecord:
    """A run directory: at least one of result.json and metrics.jsonl must be there."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    result_file, metrics_file, trial_file = path / "result.json", path / "metrics.jsonl", path / "trial.json"
    if not result_file.exists() and not metrics_file.exists():
        raise ReportError(f"{path}: no result.json or metrics.jsonl here; expected the output directory of `bilevel run`")
    result = _read_json(result_file) if result_file.exists() else None
    records = []
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    trial = _read_json(trial_file) if trial_file.exists() else None
    return RunRecord(path, label or path.name, result, records, trial)


def load_runs(paths: Sequence[str | Path]) -> list[RunRecord]:
    """Runs labelled by their directory names (parent/name where names repeat)."""
    if not paths:
        raise ReportError("no run directories given")
    resolved = [Path(p) for p in paths]
    names = [p.name for p in resolved]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in resolved]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in resolved]
    return [load_run(p, label) for p, label in zip(resolved, labels)]
