"""TensorBoard logging beside metrics.jsonl (optional: ``run.tensorboard: true`` or ``--tensorboard``).

Each metrics record becomes scalars at its step: the numbers under their names (upper_loss,
hypergrad_norm, inner_residual, linear_residual, engine-specific figures), the tracked small upper
variables as ``upper/<name>`` (``upper/<name>/<i>`` per entry of a vector) and the monitor's values
as ``monitor/<name>`` alike; a monitor vector longer than MAX_SCALARS entries is logged as a
histogram. Written through torch.utils.tensorboard into ``<run dir>/tensorboard``; a resumed run
purges the events written after its checkpoint, so the curves match an uninterrupted run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel.runtime.record_numbers import MAX_SCALARS, record_values

__all__ = ["MAX_SCALARS", "TensorBoardLogger"]


class TensorBoardLogger:
    """Writes metrics records as TensorBoard events."""

    def __init__(self, directory: Path, resume_from_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an optional extra
            raise RuntimeError(
                "TensorBoard logging needs the tensorboard package: pip install 'bilevel[tensorboard]'"
                f" (or run without run.tensorboard / --tensorboard); import failed: {exc}"
            ) from None
        purge = None if resume_from_step is None else resume_from_step + 1
        self._writer = SummaryWriter(log_dir=str(directory), purge_step=purge)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in record_values(record, MAX_SCALARS):
            if isinstance(value, float):
                self._writer.add_scalar(tag, value, step)
            else:
                import numpy as np

                self._writer.add_histogram(tag, np.asarray(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
