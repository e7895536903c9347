"""Joining a data-parallel run: the process group torchrun describes through its environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or one the caller initialized
already; the backend (NCCL for CUDA devices, gloo on CPU); each rank's device (cuda:LOCAL_RANK);
and leaving a process that held a process group (``leave_process``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NoReturn

import torch

from bilevel.distributed.reduce import World, activate, current_world

__all__ = ["choose_backend", "data_parallel", "launched_world_size", "leave_process", "process_group_was_created"]

_created_group = False
"""Set once data_parallel has initialized a process group in this process (see leave_process)."""


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
    global _created_group
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
        _created_group = created = initialized = True
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


def process_group_was_created() -> bool:
    """Whether ``data_parallel`` has initialized a process group in this process (it destroys
    the group again when its block ends). False in a single process and where the caller
    initialized the group itself."""
    return _created_group


def leave_process(code: int = 0) -> NoReturn:
    """End this process with exit status ``code``.

    After ``data_parallel`` created a process group here (``process_group_was_created``): flush
    stdout and stderr, shut logging down, and leave with ``os._exit(code)``, skipping interpreter
    finalization. gloo's worker threads outlive ``destroy_process_group`` and can abort the
    process while the interpreter finalizes ("terminate called without an active exception",
    the fault described in pytorch/pytorch#179291), which torchrun reports as a failed job
    although the run finished.
    ``os._exit`` also skips ``atexit`` handlers and the flushing of files left open. Otherwise:
    ``sys.exit(code)``, an ordinary exit."""
    if not _created_group:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # replaced by None, closed, or a broken pipe
            pass
    logging.shutdown()
    os._exit(code)
