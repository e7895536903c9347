"""Joining a data-parallel run: the process group torchrun describes through its environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or one the caller initialized
already; the backend (NCCL for CUDA devices, gloo on CPU); each rank's device (cuda:LOCAL_RANK)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch

from bilevel.distributed.reduce import World, activate, current_world

__all__ = ["choose_backend", "data_parallel", "launched_world_size"]


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def choose_backend(requested: str, device: torch.device) -> str:
    """``auto``: NCCL when the run's device is CUDA (and CUDA is present), gloo otherwise."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" and torch.cuda.is_available() else "gloo"


@contextmanager
def data_parallel(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> Iterator[tuple[World, torch.device]]:
    """Activate data parallelism for the duration of the block; yields (world, this rank's device).

    * inside an active data-parallel block already: yields that world (nothing changes);
    * torch.distributed initialized by the caller with more than one rank: joins its default
      group (and leaves it initialized afterwards);
    * launched by torchrun with WORLD_SIZE > 1: initializes the process group from the
      environment (``backend``: auto, nccl or gloo) and destroys it afterwards;
    * otherwise: a single process; nothing is communicated.

    On CUDA each rank uses cuda:LOCAL_RANK (torchrun sets LOCAL_RANK)."""
    world = current_world()
    if world.active:
        yield world, device
        return
    import torch.distributed as dist

    created = False
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and launched_world_size() > 1:
        if not dist.is_available():
            raise RuntimeError("this build of torch has no torch.distributed; data-parallel runs need it")
        chosen = choose_backend(backend, device)
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s))
        created = initialized = True
    if not initialized or dist.get_world_size() == 1:
        try:
            yield World(), device
        finally:
            if created:
                dist.destroy_process_group()
        return

    rank, size = dist.get_rank(), dist.get_world_size()
    group_backend = str(dist.get_backend())
    if group_backend == "nccl" and device.type != "cuda":
        raise RuntimeError(f"the process group uses NCCL, which cannot reduce tensors on {device}; run on cuda or use gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        if not created:
            local_rank = torch.cuda.current_device()
        device = torch.device("cuda", local_rank)
    previous = activate(World(rank, size, local_rank, group_backend))
    try:
        yield current_world(), device
    except BaseException:
        activate(previous)
        if created:
            dist.destroy_process_group()
        raise
    activate(previous)
    if created:
        _leave(dist)


def _leave(dist: Any) -> None:
    """Tear the process group down together after a run that ended well: a rank that destroys its
    group while another still talks to it (rank 0 writing results while rank 1 has finished) can
    abort the process at exit ("terminate called without an active exception"). After an error
    no barrier is waited for: the other ranks may be gone."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
