"""Atomic checkpoints: written to a temporary file in the same directory, fsynced, then renamed
over the previous one, so an interrupted write never leaves a corrupted latest checkpoint.
Loaded with ``torch.load(weights_only=True)``: a checkpoint cannot execute code.

A temporary file is named ``.NAME.PID.RANDOM.tmp`` after its target NAME and its writer's process
id. A writer that is killed (SIGKILL, out of memory) leaves it behind; the next write of the same
target, and ``load_checkpoint`` on resume, remove those whose writer is no longer running.

Files get the permissions of any file the process creates (0666 less the umask: readable by the
group and others under the usual umask 022), not the 0600 of a temporary file. ``write_new_json``
writes a file that must not replace another one (``bilevel retrain``'s results): it takes the
next free numbered name, atomically and without ever replacing an existing file."""

from __future__ import annotations

import glob
import json
import os
import pickle
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from bilevel.spec.errors import SpecError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "file_mode",
    "load_checkpoint",
    "not_a_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
    "unwritable",
    "write_new_json",
]

CHECKPOINT_NAME = "checkpoint.pt"
_writing: set[str] = set()  # temporary files this process is writing now (never stale)
_umask_lock = threading.Lock()


def file_mode() -> int:
    """The mode a new regular file gets in this process: 0o666 less the current umask."""
    with _umask_lock:  # reading the umask means setting it: no other thread may see the 0
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


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


def unwritable(path: Path, exc: OSError) -> SpecError:
    """The error for an output that cannot be written (a full disk, no permission), naming it."""
    return SpecError.single(str(path), "", f"cannot be written: {exc.strerror or exc}; free space or give another --out"
                                           " (the previous file, if any, is unchanged)")


def _atomic_replace(path: Path, write: Any) -> None:
    try:
        _replace(path, write)
    except OSError as exc:
        raise unwritable(path, exc) from None


def _replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    _writing.add(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), file_mode())  # mkstemp's 0600 would make run files private
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        _writing.discard(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, replacing the previous file."""
    _atomic_replace(path, lambda handle: handle.write(data))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, replacing the previous file."""
    atomic_write_bytes(path, _json_bytes(obj))


def write_new_json(directory: Path, stem: str, obj: Any, digits: int = 3) -> Path:
    """Write ``obj`` to the first free ``directory/STEM-NNN.json`` (NNN from 001) and return its
    path. Never replaces a file: the complete file is written under a temporary name, then
    hard-linked to its name, which fails when another writer took the name first (the next
    number is tried then); the file appears complete or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.{os.getpid()}.", suffix=".tmp", dir=directory)
    _writing.add(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(_json_bytes(obj))
            handle.flush()
            os.fchmod(handle.fileno(), file_mode())
            os.fsync(handle.fileno())
        number = 1
        while True:
            path = directory / f"{stem}-{number:0{digits}d}.json"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)
        _writing.discard(tmp)


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
