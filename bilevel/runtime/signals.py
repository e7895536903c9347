"""SIGINT and SIGTERM during the outer loop: the run stops between two outer steps, writes a
checkpoint and result.json (status "interrupted"), and the command exits with 130 (SIGINT) or
143 (SIGTERM, what schedulers such as Slurm and Kubernetes send), so that ``--resume`` continues
to the same result as an uninterrupted run. A second signal stops at once, keeping the last
checkpoint written.

The handlers are installed for the loop only, and only from the main thread (a run started
from another thread keeps Python's defaults)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["EXIT_CODES", "RunInterrupted", "StopSignals"]

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""128 + the signal's number, as shells report a process a signal ended."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal; ``checkpoint`` is the one to resume from (None: none yet). A
    KeyboardInterrupt, so that what handles Ctrl-C (a sweep recording its trial as interrupted, a
    tracker closing its run) handles SIGTERM alike, and ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None, at_once: bool = False):
        name = signal.Signals(signum).name
        where = f" after {step} outer steps" if step is not None else ""
        how = " (a second signal: stopped at once)" if at_once else ""
        message = f"{name} received: stopped{where}{how}"
        if checkpoint is not None:
            message += f"; the checkpoint is {checkpoint} (continue with --resume)"
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = EXIT_CODES.get(signal.Signals(signum), 128 + int(signum))


class StopSignals:
    """A context manager: while inside, the first SIGINT or SIGTERM sets ``received`` (the loop
    checks it between outer steps); a second one raises RunInterrupted where the program is."""

    def __init__(self, say: Any = None):
        self.received: int | None = None
        self._say = say
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise RunInterrupted(signum, at_once=True)
        self.received = signum
        sys.stderr.write(f"{signal.Signals(signum).name} received: stopping after this outer step (again to stop at once)\n")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
