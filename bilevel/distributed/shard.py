"""Sharding a level's data over the ranks of a data-parallel run.

The examples (the rows: every tensor's first dimension) are split into W contiguous shards of
sizes differing by at most one, after the data source has loaded the whole set on every rank:
rank r holds rows [start_r, start_r + n_r) with n_r = floor(N / W) + (1 if r < N mod W else 0).
Its weight in the union objective is w_r = n_r / N (see bilevel.distributed.reduce), which makes
full-batch objectives exact whatever the shard sizes; with minibatches each rank samples from its
own shard, and the weighted sum stays an unbiased estimate of the union objective.

Every column is sliced alike, so an example index shipped with the data (hyper-cleaning's
``index``, which selects each example's upper-level weight) keeps its global values in a shard.

A meta-batch of M tasks is split the same way, at every evaluation rather than once: every rank
draws the whole meta-batch and holds every task's variables, and evaluates the objectives on its
own tasks [start_r, stop_r) only (``own_rows``; ``bilevel.problem.tasks``)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from bilevel.distributed.reduce import current_world

__all__ = ["own_rows", "replicated_share", "shard_bounds", "shard_rows"]


def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """(start, stop) of rank's contiguous shard of ``total`` rows over ``size`` ranks."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def own_rows(total: int) -> tuple[int, int] | None:
    """(start, stop) of this rank's contiguous rows of ``total`` under the active data-parallel
    world; None in a single process (every row is this process's)."""
    world = current_world()
    return shard_bounds(total, world.rank, world.size) if world.active else None


def shard_rows(data: Mapping[str, Tensor], rank: int, size: int) -> tuple[dict[str, Tensor], float]:
    """This rank's rows of every tensor and its weight n_r / N. Raises ValueError for an empty shard."""
    total = next(iter(data.values())).shape[0]
    start, stop = shard_bounds(total, rank, size)
    if stop <= start:
        raise ValueError(f"{total} examples cannot be split over {size} processes (rank {rank} would get none)")
    return {name: value[start:stop] for name, value in data.items()}, (stop - start) / total


def replicated_share(size: int) -> float:
    """The weight of a level whose data every rank holds whole (or that has no data): 1 / W."""
    return 1.0 / size
