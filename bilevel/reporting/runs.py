"""Reading run directories back: result.json, metrics.jsonl and, for sweep trials, trial.json.

``expand_run_paths`` turns what a person passes (run directories, a directory of run
directories such as a sweep's, glob patterns) into run directories; ``read_runs`` reads them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bilevel.plain import flat_numbers

__all__ = ["ReportError", "RunRecord", "expand_run_paths", "is_run_dir", "read_run", "read_runs"]


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
    """metrics.jsonl, one dict per logged step (lines that are not records are skipped)."""
    trial: dict[str, Any] | None = None
    """trial.json of a sweep trial: study, number and sampled parameters."""
    skipped: list[int] = field(default_factory=list)
    """Numbers of the metrics.jsonl lines that are not records (skipped; see ``_read_metrics``)."""

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
        """completed, stopped_early or diverged (result.json); for a run without result.json,
        interrupted when its sweep trial says so, else incomplete (killed, or still running)."""
        if self.result is None:
            if self.trial is not None and self.trial.get("status") == "interrupted":
                return "interrupted"
            return "incomplete"
        return str(self.result.get("status", "completed"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it ({exc})") from None


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory (holds result.json or metrics.jsonl)."""
    return path.is_dir() and ((path / "result.json").exists() or (path / "metrics.jsonl").exists())


def expand_run_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Run directories from what a person names: a run directory stands for itself; a directory
    that is not one but holds run directories (a sweep's trials, runs/) for those, in name
    order; a string with ``*``, ``?`` or ``[`` that names no existing path for the paths it
    matches (in name order). Anything else is kept as it is, for ``read_run`` to say what is wrong."""
    import glob as globbing

    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists() and any(ch in str(item) for ch in "*?["):
            out += [Path(p) for p in sorted(globbing.glob(str(item)))]
        elif path.is_dir() and not is_run_dir(path):
            inner = sorted(p for p in path.iterdir() if is_run_dir(p))
            out += inner or [path]
        else:
            out.append(path)
    return out


def read_run(path: str | Path, label: str | None = None) -> RunRecord:
    """A run directory: at least one of result.json and metrics.jsonl must be there."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    result_file, metrics_file, trial_file = path / "result.json", path / "metrics.jsonl", path / "trial.json"
    if not result_file.exists() and not metrics_file.exists():
        raise ReportError(f"{path}: no result.json or metrics.jsonl here, nor run directories inside;"
                          " expected the output directory of `bilevel run`")
    result = _read_json(result_file) if result_file.exists() else None
    records, skipped = _read_metrics(metrics_file) if metrics_file.exists() else ([], [])
    trial = _read_json(trial_file) if trial_file.exists() else None
    return RunRecord(path, label or path.name, result, records, trial, skipped)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of metrics.jsonl and the numbers of the lines that are not records (a torn
    last line of a killed run, or anything else written into the file: binary garbage, JSON that
    is not a record, a step that is not a whole number, groups that are not mappings)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it ({exc})") from None
    records, skipped = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or any(
                not isinstance(record.get(group, {}), dict) for group in ("upper", "monitor")):
            skipped.append(number)
            continue
        records.append(record)
    return records, skipped


def read_runs(paths: str | Path | Sequence[str | Path]) -> list[RunRecord]:
    """The runs ``paths`` name (``expand_run_paths``), labelled by their directory names
    (parent/name where names repeat)."""
    resolved = expand_run_paths(paths)
    if not resolved:
        raise ReportError(f"no run directories in {paths if isinstance(paths, (str, Path)) else ', '.join(map(str, paths)) or 'the arguments'}")
    names = [p.name for p in resolved]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in resolved]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in resolved]
    return [read_run(p, label) for p, label in zip(resolved, labels)]
