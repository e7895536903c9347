"""Sums over data-parallel ranks: the one place where a hypergradient talks to torch.distributed.

Semantics. A data-parallel run has W ranks (processes). Each level's examples are split into
shards; rank r holds n_r of the level's N examples and evaluates its *share* of the level's
objective (``Problem.upper_objective`` / ``lower_objective`` apply the weight):

    G^(r)(x, y) = w_r G_r(x, y),   w_r = n_r / N    (w_r = 1 / W when every rank holds the whole data),

with G_r the user's objective on the rank's batch, so that the union objective is the sum of the
shares, G = sum_r G^(r). This is exact for objectives that are a *mean over the batch's examples
plus terms that do not depend on the batch* (a regularizer, a prior): the weights sum to one, so
sum_r w_r (mean_r + R) = mean over the union + R. An objective that sums over examples must be
written as a mean. The variables (x, y, optimizer states, linear-solver iterates) are replicated:
every rank holds the same values and applies the same updates to them, in the same order.

(a) Values. Everything an engine consumes as a value is the sum over ranks of the local
    quantity: gradients of the shares (inner-loop gradients, grad_x / grad_y of F and G),
    objective values, each Hessian-vector product H v = sum_r H^(r) v (v replicated) and each
    mixed product J^T v = sum_r (J^(r))^T v. The Linearization keeps the graph of its *local*
    grad_y G^(r) and sums each product: summing grad_y inside the double-backward graph would hand
    every rank the summed gradient, and the backward of that sum would then add up the replicated
    cotangent v over the ranks, multiplying the product by W.
(b) Differentiating through sums (the unrolled engine). An inner step
    y_{t+1} = Phi(x, y_t, sum_r g_r(x, y_t)) uses a differentiable sum whose backward is again a
    sum over ranks. Adjoints are *partial* during the backward pass: the adjoint a rank holds for
    a replicated quantity is its part of the true adjoint, which is the sum over ranks. Every
    backward rule is linear in its cotangent, so replicated operations map partial adjoints to
    partial adjoints; the sum's backward turns the partial adjoints of its (replicated) output into
    the full adjoint of each rank's local input; and the backward starts from each rank's share of
    F, a partial seed. The adjoint of x is therefore partial and is summed once at the end (with
    the loss value, in one collective); adjoints handed between recomputed checkpoint segments
    stay partial and need no communication.

Minibatches: each rank draws its minibatch from its own shard, so a step sees W minibatches and
the weighted sum is an unbiased estimate of the union objective; with full batches the sums are
the union's exactly.

In a single process (no active data-parallel group) nothing here communicates and every function
returns its input unchanged, at the cost of one attribute check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["World", "activate", "alone", "current_world", "sum_over_ranks", "sum_over_ranks_differentiable"]


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (rank 0 of 1 in a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        """More than one rank: collectives are needed."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes outputs."""
        return self.rank == 0


_STATE: dict[str, Any] = {"world": World(), "group": None}


def current_world() -> World:
    """The active data-parallel world (a single process unless a run activated one)."""
    return _STATE["world"]


def activate(world: World, group: Any = None) -> World:
    """Make ``world`` the active one (``group``: its process group, None for the default group);
    returns the previously active world, for restoring it."""
    previous = _STATE["world"]
    _STATE["world"] = world
    _STATE["group"] = group
    return previous


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside: this process computes as a single one, whatever the active world: nothing is
    summed over ranks and a meta-batch is not split. For what one rank does by itself while the
    others wait (rank 0's meta-test), where a collective would wait for ranks that never enter it."""
    previous, group = _STATE["world"], _STATE["group"]
    activate(World())
    try:
        yield
    finally:
        activate(previous, group)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    parts = torch.split(flat, [t.numel() for t in like])
    return tuple(part.view(t.shape) for part, t in zip(parts, like))


def _by_dtype(tensors: tuple[Tensor, ...], reduce: Any) -> tuple[Tensor, ...]:
    """Apply ``reduce`` (flat tensor -> flat tensor) to the tensors packed per dtype, one
    collective per dtype (one in practice: a problem has one floating dtype)."""
    out: list[Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        index = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        group = [tensors[i] for i in index]
        for i, value in zip(index, _unflat(reduce(_flat(group)), group)):
            out[i] = value
    return tuple(out)  # type: ignore[arg-type]


def _all_reduce(flat: Tensor) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=_STATE["group"])
    return flat


def sum_over_ranks(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """sum_r t_r for each tensor, as values (detached). In a single process: the input, unchanged."""
    if not _STATE["world"].active:
        return tuple(tensors)
    return _by_dtype(tuple(t.detach() for t in tensors), _all_reduce)


class _SumOverRanks(torch.autograd.Function):
    """out = sum_r t_r; backward: the cotangent of t_r is the sum over ranks of the (partial)
    cotangents of out, itself differentiable."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor) -> Tensor:  # type: ignore[override]
        return _all_reduce(flat.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx: Any, cotangent: Tensor) -> Tensor:  # type: ignore[override]
        return _SumOverRanks.apply(cotangent.contiguous())


def sum_over_ranks_differentiable(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """sum_r t_r for each tensor, differentiable under the partial-adjoint convention (see the
    module docstring). In a single process: the input, unchanged."""
    if not _STATE["world"].active:
        return tuple(tensors)
    return _by_dtype(tuple(tensors), _SumOverRanks.apply)
