"""Atomic checkpoints: written to a temporary file in the same directory, fsynced, then renamed
over the previous one, so an interrupted write never leaves a corrupted latest checkpoint.
Loaded with ``torch.load(weights_only=True)``: a checkpoint cannot execute code."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_json", "atomic_write_bytes", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    """The latest checkpoint in ``directory``, or None when there is none."""
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
