"""What a run records each logged step: the metrics record (upper loss, hypergradient norm, the
engine's stats, small upper variables, monitor values), written to metrics.jsonl, TensorBoard
and the progress display; the record's numbers by name for the loggers that take scalars
(``bilevel.runtime.record_numbers``, re-exported here)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bilevel.hyperparameters import Categorical
from bilevel.plain import plain
from bilevel.problem import Params, Problem
from bilevel.runtime.callbacks import MetricsWriter, Progress
from bilevel.runtime.record_numbers import MAX_SCALARS, flat_numbers, flat_params, record_values, scalar_values

__all__ = [
    "MAX_SCALARS",
    "TRACKED_UPPER_NUMEL",
    "Recorder",
    "TrackedUpper",
    "flat_numbers",
    "flat_params",
    "monitor_values",
    "record_values",
    "scalar_values",
]

TRACKED_UPPER_NUMEL = 16
"""Upper tensor variables with at most this many entries are logged in every metrics record
(under "upper"), so that hyperparameter trajectories need no monitor."""


class TrackedUpper:
    """The upper tensor variables small enough to log every step, read in user units as
    objectives see them (a hyperparameter through its transform; a categorical one with string
    choices as the index of its choice)."""

    def __init__(self, problem: Problem):
        upper = problem.upper
        self.entries: list[tuple[str, Callable[[Params], torch.Tensor], tuple[int, ...]]] = []
        for name, index in upper.tensors.items():
            transform = upper.transforms.get(name)
            if transform is None:
                reader = lambda x, i=index: x[i]  # noqa: E731
            elif isinstance(transform, Categorical) and transform.table is None:
                reader = lambda x, i=index: torch.argmax(x[i])  # noqa: E731
            else:
                reader = lambda x, i=index, t=transform: t.value(x[i])  # noqa: E731
            sample = reader(upper.init)
            if sample.numel() <= TRACKED_UPPER_NUMEL:
                self.entries.append((name, reader, tuple(sample.shape)))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def read(self, x: Params, dtype: torch.dtype) -> list[torch.Tensor]:
        """Their current values as flat tensors (read together with the loss, in one host sync)."""
        with torch.no_grad():
            return [reader(x).reshape(-1).to(dtype) for _, reader, _ in self.entries]

    def unflatten(self, values: list[float]) -> dict[str, Any]:
        """Name -> its value (a number, or a flat list for a tensor with several entries)."""
        out: dict[str, Any] = {}
        offset = 0
        for name, _, shape in self.entries:
            n = math.prod(shape)
            chunk = values[offset : offset + n]
            out[name] = chunk[0] if not shape else chunk
            offset += n
        return out


def monitored(problem: Problem) -> bool:
    """Whether the problem (or each of its instances) has a monitor."""
    return problem.monitor is not None or (problem.instance_batch and problem.stacked.monitored)


def monitor_values(problem: Problem, x: Params, y: Params, step: int, out_dir: Path) -> dict[str, Any]:
    """The spec's monitor at the current variables, as JSON-ready values."""
    if problem.instance_batch:
        return {"instances": problem.stacked.monitors(x, y, step, out_dir)}
    assert problem.monitor is not None
    with torch.no_grad():
        values = problem.monitor(problem.upper.view(tuple(p.detach() for p in x)), problem.lower.view(y),
                                 step=step, out_dir=out_dir)
    return plain(dict(values or {}))


class Recorder:
    """metrics.jsonl, TensorBoard events and the progress bar of one run (on rank 0; silent elsewhere)."""

    def __init__(self, out_dir: Path, main: bool, resumed_at: int | None, tensorboard: bool, progress: Progress):
        self.metrics = MetricsWriter(out_dir / "metrics.jsonl", resumed_at) if main else None
        self.board = None
        if main and tensorboard:
            from bilevel.runtime.tensorboard import TensorBoardLogger  # optional dependency, imported when asked for

            self.board = TensorBoardLogger(out_dir / "tensorboard", resumed_at)
        self.progress = progress

    def write(self, record: dict[str, Any]) -> None:
        if not record:
            return
        if self.metrics is not None:
            self.metrics.write(record)
        if self.board is not None:
            self.board.write(record)

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.board is not None:
            self.board.close()
