"""What the runtime exchanges between ranks besides sums: per-rank state gathered on rank 0 for a
checkpoint, a checkpoint broadcast from rank 0 on resume, decisions taken on rank 0, and a check
that the replicated variables are still identical on every rank."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from bilevel.distributed.reduce import current_world

__all__ = ["ReplicaMismatch", "broadcast_from_main", "check_replicas", "gather_on_main"]

T = TypeVar("T")


class ReplicaMismatch(RuntimeError):
    """Replicated variables differ between ranks (objectives or constraints that depend on the
    rank in a way the union objective does not describe, or nondeterministic replicated code)."""


def gather_on_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the other ranks ([obj] in a single process)."""
    world = current_world()
    if not world.active:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (the argument is ignored on the other ranks)."""
    world = current_world()
    if not world.active:
        return obj
    import torch.distributed as dist

    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def check_replicas(tensors: Sequence[Tensor], what: str) -> None:
    """Raise ReplicaMismatch unless ``tensors`` hold the same values on every rank.

    Compares per-tensor checksums (sum and sum of squares in float64) with one MAX and one MIN
    collective, so it costs two small all-reduces whatever the tensors' size."""
    world = current_world()
    if not world.active or not tensors:
        return
    import torch.distributed as dist

    # NCCL reduces CUDA tensors only; gloo takes CPU ones (the tensors themselves may live on either)
    device = torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")
    sums = [torch.stack([t.detach().double().sum(), (t.detach().double() ** 2).sum()]).to(device) for t in tensors]
    checksum = torch.cat(sums)
    high, low = checksum.clone(), checksum.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise ReplicaMismatch(
            f"the {what} differ between ranks: the replicated variables have diverged. Objectives must"
            " depend on the rank only through its data shard, and constraints not at all"
        )
