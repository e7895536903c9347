"""A run's directory, claimed before anything is written into it: one run at a time (an exclusive
lock), and never another problem's run (its records stay byte for byte as they were).

The lock is ``DIR/.bilevel.lock``, held with ``fcntl.flock`` for as long as the run lasts: the
kernel releases it when the process ends however it ends (SIGKILL included), so a lock is never
stale. The file names its holder (process id, host, start time, spec), which is what a second
run on the same directory is told.

A directory "holds a run" when it has any of the files a run writes (``RUN_FILES``). Its problem
is the fingerprint of ``spec.json`` (``bilevel.compile.spec_fingerprint``: the spec without the
run settings that do not change the computation), else the checkpoint's. A run whose fingerprint
differs is refused unless ``overwrite`` (then the old run's files are removed first); the same
problem is rerun in place, or resumed with ``--resume``."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from bilevel.spec.errors import SpecError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (one run per directory is then the user's to keep)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RUN_FILES", "RunDirectory", "check_out_path"]

LOCK_NAME = ".bilevel.lock"
RUN_FILES = ("spec.json", "result.json", "metrics.jsonl", "checkpoint.pt")


def check_out_path(out: str | Path, field: str = "run.out") -> Path:
    """The run directory as a Path; a SpecError for an empty path (which would be the working
    directory: the run's files among the user's)."""
    if str(out).strip() == "":
        raise SpecError.single("--out", field, "is empty, which would write the run into the working directory;"
                                               " give a directory such as runs/NAME")
    return Path(out)


class RunDirectory:
    """The claim on one run directory (a context manager; see the module docstring)."""

    def __init__(self, path: Path, fingerprint: str, spec_file: str, resume: bool = False, overwrite: bool = False):
        self.path, self.fingerprint, self.spec_file = path, fingerprint, spec_file
        self.resume, self.overwrite = resume, overwrite
        self._handle: Any = None

    def __enter__(self) -> RunDirectory:
        if self.path.exists() and not self.path.is_dir():
            raise SpecError.single("--out", "run.out", f"{self.path} is a file, not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_owner()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._unlock()

    def _lock(self) -> None:
        if fcntl is None:
            return
        lock = self.path / LOCK_NAME
        handle = open(lock, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SpecError.single("--out", "run.out", f"{self.path} is in use by another run ({holder}); wait for it"
                                                       " to finish or give another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')},"
                     f" spec {self.spec_file}\n")
        handle.flush()
        self._handle = handle

    def _unlock(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.seek(0)
            handle.truncate()  # the holder's line goes with the lock (the file itself stays: removing
            handle.close()     # it would let two later runs lock two different files)

    def _check_owner(self) -> None:
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return
        theirs = self._fingerprint_there()
        if theirs == self.fingerprint:
            return
        if self.overwrite:
            for name in present:
                (self.path / name).unlink()
            return
        what = (f"a run of a different spec (fingerprint {theirs}, this spec's is {self.fingerprint})" if theirs
                else f"files of a run that cannot be identified ({', '.join(present)})")
        hint = "--resume continues only a run of the same spec. " if self.resume else ""
        raise SpecError.single("--out", "run.out", f"{self.path} holds {what}; nothing was changed. {hint}Give another"
                                                   " --out, or --overwrite to replace that run")

    def _fingerprint_there(self) -> str | None:
        record = self.path / "spec.json"
        if record.exists():
            try:
                data = json.loads(record.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(data, dict) and isinstance(data.get("fingerprint"), str):
                return data["fingerprint"]
            return _fingerprint_of_record(self.path)
        checkpoint = self.path / "checkpoint.pt"
        if checkpoint.exists():
            from bilevel.runtime.atomic import load_checkpoint

            try:
                state = load_checkpoint(self.path)
            except SpecError:
                return None
            return state.get("fingerprint") if isinstance(state, dict) else None
        return None


def _fingerprint_of_record(directory: Path) -> str | None:
    """The fingerprint of a spec.json written before the record held one."""
    from bilevel.compile import spec_fingerprint
    from bilevel.runtime.spec_record import load_spec_record

    try:
        return spec_fingerprint(load_spec_record(directory).spec)
    except (SpecError, KeyError, TypeError):
        return None
