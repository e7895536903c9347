"""Checkpoints of a run, consistent across the ranks of a data-parallel run.

A run's state (``bilevel.runtime.session.Session.state_dict``) holds replicated parts (step,
upper variables, outer optimizer, engine state), identical on every rank, and each rank's own
parts (``LOCAL``: its data streams' shuffling state and its RNG state). Rank 0 gathers the
per-rank parts and alone writes the file (atomically, see ``bilevel.runtime.atomic``); before
writing, the ranks check that the replicated state is still identical.
On resume rank 0 reads the checkpoint and broadcasts it, so every rank loads the same one (no
shared file system needed), and each rank takes back its own part. A checkpoint is resumed by the
number of processes that wrote it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from bilevel.distributed import broadcast_from_main, check_replicas, current_world, gather_on_main
from bilevel.runtime.atomic import CHECKPOINT_NAME, load_checkpoint, not_a_checkpoint, save_checkpoint

__all__ = ["FORMAT", "LOCAL", "WorldSizeMismatch", "load_snapshot", "save_snapshot", "save_state"]

FORMAT = 2
"""Checkpoint layout version: 1 kept engine-specific state under "extra" (still read), 2 holds
each engine's typed state fields."""
LOCAL = ("data", "rng")
_RUN_KEYS = {"step", "fingerprint", "x", "optimizer"}
"""The parts of a run's state that belong to each rank."""


class WorldSizeMismatch(ValueError):
    """The checkpoint was written by a different number of processes."""


def save_snapshot(directory: Path, replicated: dict[str, Any], local: dict[str, Any]) -> Path:
    """Write a checkpoint of ``replicated`` (same on every rank) and every rank's ``local`` part.
    Collective: every rank calls it; only rank 0 writes. Returns the checkpoint's path."""
    world = current_world()
    check_replicas(list(_tensors(replicated)), "upper variables, optimizer or engine state")
    parts = gather_on_main(local)
    if world.is_main:
        assert parts is not None
        state = {**replicated, **parts[0], "world_size": world.size}
        if world.active:
            state["ranks"] = parts
        return save_checkpoint(directory, state)
    return directory / CHECKPOINT_NAME


def save_state(directory: Path, state: dict[str, Any]) -> Path:
    """Write a run's ``state_dict`` as a checkpoint (collective): its ``LOCAL`` parts per rank."""
    replicated = {key: value for key, value in state.items() if key not in LOCAL}
    local = {key: state[key] for key in LOCAL}
    return save_snapshot(directory, {"format": FORMAT, **replicated}, local)


def load_snapshot(directory: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(checkpoint, this rank's local part) from rank 0's copy of the latest checkpoint, or None.
    Collective. Raises WorldSizeMismatch when a different number of processes wrote it."""
    world = current_world()
    checkpoint = broadcast_from_main(load_checkpoint(directory) if world.is_main else None)
    if checkpoint is None:
        return None
    if not _RUN_KEYS <= checkpoint.keys():  # a torch file of someone else's (a model's state_dict, ...)
        raise not_a_checkpoint(directory / CHECKPOINT_NAME, None)
    written_by = int(checkpoint.get("world_size", 1))
    if written_by != world.size:
        raise WorldSizeMismatch(
            f"the checkpoint in {directory} was written by a run with {written_by} process(es), this run has"
            f" {world.size}; resume with the same number (torchrun --nproc_per_node {written_by})"
        )
    local = checkpoint["ranks"][world.rank] if "ranks" in checkpoint else checkpoint
    return checkpoint, local


def _tensors(value: Any) -> Any:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
