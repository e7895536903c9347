"""Data-parallel bilevel runs over torch.distributed (launched by torchrun): which rank this is,
how each level's data is sharded, and the sums over ranks that make every hypergradient the one
of the union of the shards (semantics in bilevel.distributed.reduce)."""

from __future__ import annotations

from bilevel.distributed.launch import (
    choose_backend,
    data_parallel,
    launched_world_size,
    leave_process,
    process_group_was_created,
)
from bilevel.distributed.reduce import World, alone, current_world, sum_over_ranks, sum_over_ranks_differentiable
from bilevel.distributed.shard import own_rows, replicated_share, shard_bounds, shard_rows
from bilevel.distributed.collectives import ReplicaMismatch, broadcast_from_main, check_replicas, gather_on_main

__all__ = [
    "ReplicaMismatch",
    "World",
    "alone",
    "broadcast_from_main",
    "check_replicas",
    "choose_backend",
    "current_world",
    "data_parallel",
    "gather_on_main",
    "launched_world_size",
    "leave_process",
    "own_rows",
    "process_group_was_created",
    "replicated_share",
    "shard_bounds",
    "shard_rows",
    "sum_over_ranks",
    "sum_over_ranks_differentiable",
]
