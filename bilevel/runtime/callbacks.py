"""What the outer loop reports each step: a metrics.jsonl writer and the progress display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bilevel.reporting.numbers import format_number
from bilevel.runtime.atomic import atomic_write_bytes, unwritable

__all__ = ["MetricsWriter", "Progress"]


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``. On resume, records past the
    checkpoint's step are dropped first so the file matches an uninterrupted run; the file is
    rewritten atomically (checkpoint.atomic_write_bytes), so a process killed meanwhile leaves
    either the old file or the new one, never a truncated one."""

    def __init__(self, path: Path, resume_from_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_from_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_from_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        self._handle = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        except OSError as exc:  # a full disk: name the file
            raise unwritable(self.path, exc) from None

    def close(self) -> None:
        self._handle.close()


class Progress:
    """What a run shows of its progress, on standard error (standard output keeps the results).

    On a terminal: a rich progress bar with the step counter, the upper loss, the hypergradient
    norm and the elapsed time. Elsewhere (a log file, a pipe, a CI log): one plain line about
    every tenth of the run and at its last step, ``NAME: step 30/150  upper loss 0.31245
    |hypergrad| 0.00231  elapsed 2.1s``, never cut to a terminal width. Silent when disabled."""

    LINES = 10
    """Plain lines per run (about): one every ``ceil(total / LINES)`` steps, and the last."""

    def __init__(self, total: int, start: int, enabled: bool, description: str, stream: Any = None):
        self.enabled = enabled
        self.total = total
        self.description = description
        self._stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._every = max(1, -(-total // self.LINES))
        self._began = time.perf_counter()
        if enabled and _is_terminal(self._stream):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=None),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=Console(file=self._stream),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, loss: float, grad_norm: float) -> None:
        if not self.enabled:
            return
        info = f"upper loss {format_number(loss)}  |hypergrad| {format_number(grad_norm)}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self._every == 0 or step == self.total:
            elapsed = time.perf_counter() - self._began
            self._stream.write(f"{self.description}: step {step}/{self.total}  {info}  elapsed {elapsed:.1f}s\n")
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
