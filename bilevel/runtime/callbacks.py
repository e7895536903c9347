"""What the outer loop reports each step: a metrics.jsonl writer and a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bilevel.runtime.atomic import atomic_write_bytes

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
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class Progress:
    """A rich progress bar showing the upper loss and hypergradient norm (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool, description: str):
        self.enabled = enabled
        self._bar: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                transient=False,
                console=None if sys.stderr.isatty() else None,
            )
            self._task = self._bar.add_task(description, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, loss: float, grad_norm: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"upper loss {loss:.4g}  |hypergrad| {grad_norm:.3g}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
