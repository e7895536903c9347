"""Atomic checkpoints: written to a temporary file in the same directory, fsynced, then renamed
over the previous one, so an interrupted write never leaves a corrupted latest checkpoint.
Loaded with ``torch.load(weights_only=True)``: a checkpoint cannot execute code.

A temporary file is named ``.NAME.PID.RANDOM.tmp`` after its target NAME and its writer's process
id. A writer that is killed (SIGKILL, out of memory) leaves it behind; the next write of the same
target, and ``load_checkpoint`` on resume, remove those whose writer is no longer running."""

from __future__ import annotations

import glob
import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from bilevel.spec.errors import SpecError

__all__ = ["atomic_write_json", "atomic_write_bytes", "load_checkpoint", "not_a_checkpoint", "remove_stale_temporaries", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
_writing: set[str] = set()  # temporary files this process is writing now (never stale)


def _running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left in its directory: those named
    ``.NAME.PID.*.tmp`` whose process PID no longer runs (or is this process, which is not writing
    them). Files of writers still running are kept. Returns the paths removed."""
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = candidate.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or str(candidate) in _writing:
            continue
        if int(pid) == os.getpid() or not _running(int(pid)):
            try:
                candidate.unlink()
                removed.append(candidate)
            except FileNotFoundError:  # removed by another cleaner meanwhile
                pass
    return removed


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    _writing.add(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        _writing.discard(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_replace(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically."""
    path = directory / CHECKPOINT_NAME
    _atomic_replace(path, lambda handle: torch.save(state, handle))
    return path


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The latest checkpoint in ``directory``, or None when there is none. Temporary files that
    a killed writer left beside it are removed. A file that is not a readable checkpoint (empty,
    truncated, foreign, holding objects other than tensors and containers) is a SpecError naming it."""
    path = directory / CHECKPOINT_NAME
    remove_stale_temporaries(path)  # a missing directory holds none: its glob yields nothing
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle's protocol are not the user's concern
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, foreign or hostile: never unpickled beyond weights_only
        raise not_a_checkpoint(path, exc) from None
    if not isinstance(state, dict):
        raise not_a_checkpoint(path, None)
    return state


def not_a_checkpoint(path: Path, exc: BaseException | None) -> SpecError:
    """The error for a file that is not a readable bilevel checkpoint. torch's own message is not
    passed on: for a pickle holding arbitrary objects it advises loading with weights_only=False,
    which would let the file run code."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        why = "the file is empty"
    elif exc is None:
        why = "it does not hold a bilevel run's state"
    elif isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc).lower():
        why = "it holds objects a checkpoint never holds (it was not written by bilevel; it is not loaded)"
    else:
        why = f"it cannot be read as a torch file ({size} bytes; truncated or not a checkpoint)"
    return SpecError.single(str(path), "", f"is not a bilevel checkpoint (or is corrupted): {why}. Move it away to start"
                                           " over, or give another --out")
