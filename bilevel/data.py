"""Minibatch streams over a level's data, sampled on the device without host synchronization,
and the evaluation of an objective on a level's whole data set, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["DataStream", "begin_outer_step", "evaluate_on_all_data", "iter_chunks"]


class DataStream:
    """Epochs of shuffled minibatches over a mapping name -> Tensor (equal first dimensions).

    With ``batch_size=None`` every batch is the whole data set (deterministic, no indexing cost).
    Shuffling uses a seeded generator, so a resumed run draws the same batches. The generator
    lives on the data's device: on CUDA the permutation is drawn there (no host round trip, which
    would synchronize), so the batch sequence of a seed differs between CPU and CUDA runs.

    ``order`` (the spec's ``data.order``) says which batch each draw returns: ``shuffled``, the
    next minibatch at every draw (a fresh batch at each inner step); ``per_outer_step``, one
    minibatch per outer step, returned by every draw of the step; ``paired``, the examples at the
    indices of ``leader``'s current batch (the top level's batch of this outer step), held for the
    step. An outer step begins with ``begin_outer_step``."""

    def __init__(self, data: Mapping[str, Tensor], batch_size: int | None, seed: int, order: str = "shuffled"):
        self.data = dict(data)
        sizes = {v.shape[0] for v in self.data.values()}
        self.size = sizes.pop() if sizes else 0
        self.batch_size = batch_size if batch_size is not None and batch_size < self.size else None
        device = next(iter(self.data.values())).device
        self._generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
        self._generator.manual_seed(seed)
        self._device = device
        self._perm: Tensor | None = None
        self._cursor = 0
        self.order = order
        self.leader: DataStream | None = None
        """The stream whose current indices a paired stream takes."""
        self.index: Tensor | None = None
        """The example indices of the last minibatch drawn (None: the whole set, or nothing drawn yet)."""
        self._held: dict[str, Tensor] | None = None

    @property
    def full(self) -> dict[str, Tensor]:
        """The whole data set as one batch."""
        return self.data

    def chunks(self) -> Iterator[tuple[dict[str, Tensor], int]]:
        """The whole data set in order, as consecutive batches of ``batch_size`` examples (the
        last one smaller) with the number of examples in each; one batch, the whole set, when
        ``batch_size`` is None."""
        yield from iter_chunks(self.data, self.size, self.batch_size)

    def begin_outer_step(self) -> None:
        """A new outer step: a held batch (per_outer_step, paired) is drawn again at the next draw."""
        self._held = None

    def next(self) -> dict[str, Tensor]:
        """The batch of this draw (see ``order``; the whole set when batch_size is None)."""
        if self.order == "shuffled":
            return self._draw()
        if self._held is None:
            if self.order == "per_outer_step":
                self._held = self._draw()
            else:
                index = None if self.leader is None else self.leader.index
                self._held = self.data if index is None else {name: v.index_select(0, index) for name, v in self.data.items()}
        return self._held

    def _draw(self) -> dict[str, Tensor]:
        """The next minibatch of the level's own shuffled epochs."""
        if self.batch_size is None:
            return self.data
        if self._perm is None or self._cursor + self.batch_size > self.size:
            self._perm = torch.randperm(self.size, generator=self._generator, device=self._generator.device).to(self._device)
            self._cursor = 0
        index = self._perm[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        self.index = index
        return {name: value.index_select(0, index) for name, value in self.data.items()}

    def state_dict(self) -> dict[str, object]:
        return {
            "generator": self._generator.get_state(),
            "perm": None if self._perm is None else self._perm.cpu(),
            "cursor": self._cursor,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self._generator.set_state(state["generator"])  # type: ignore[arg-type]
        perm = state["perm"]
        self._perm = None if perm is None else perm.to(self._device)  # type: ignore[union-attr]
        self._cursor = int(state["cursor"])  # type: ignore[arg-type]


def begin_outer_step(streams: Iterable[Any]) -> None:
    """Tell every level's data stream (None: a level without data) that an outer step begins."""
    for stream in streams:
        if stream is not None and hasattr(stream, "begin_outer_step"):
            stream.begin_outer_step()


def iter_chunks(
    data: dict[str, Tensor], size: int, batch_size: int | None, dim: int = 0
) -> Iterator[tuple[dict[str, Tensor], int]]:
    """``data`` (``size`` examples along dimension ``dim`` of every tensor) in order, as
    consecutive batches of ``batch_size`` examples (the last one smaller) with the number of
    examples in each; ``data`` itself, once, when ``batch_size`` is None."""
    if batch_size is None:
        yield data, size
        return
    for start in range(0, size, batch_size):
        stop = min(start + batch_size, size)
        yield {name: value.narrow(dim, start, stop - start) for name, value in data.items()}, stop - start


class _Chunked(Protocol):
    size: int

    def chunks(self) -> Iterator[tuple[Any, int]]: ...


def evaluate_on_all_data(objective: Callable[[Any], Tensor], data: _Chunked | None) -> Tensor:
    """An objective's value on a level's whole data set, one minibatch at a time.

    With consecutive chunks B_1 .. B_K of n_1 .. n_K examples (``data.chunks()``: batches of the
    level's ``batch_size``, the last one possibly smaller; N = sum_k n_k),

        F(all data) = sum_k (n_k / N) F(B_k),

    which is exact for the objectives the framework assumes wherever it draws minibatches or sums
    data-parallel shares (``bilevel.distributed.reduce``): a *mean* over the batch's examples plus
    terms that do not depend on the batch, F(B) = (1/|B|) sum_{i in B} f_i + R, since the weights
    sum to one. The weights n_k / N matter: an unweighted mean of the chunk values would count the
    examples of a smaller last chunk more. Peak memory is that of one minibatch (as in training),
    not that of the whole set (a DARTS supernet's activations on CIFAR-10's 25k validation images
    at once would take tens of GiB).

    A level whose data declares no batch size (``data.batch_size`` None) is evaluated in one
    batch, the whole set: its objective may be any function of the whole data (a sum over
    examples, a statistic of the set), since it is never evaluated on parts of it. Objectives
    whose value depends on the batch beyond a mean over its examples (batch statistics:
    BatchNorm in training mode, as in the DARTS supernet) give the average of their minibatch
    values, the quantity that training on those minibatches estimates. ``data`` None (a level
    without data): ``objective(None)``. The objective's value may be a tensor of any shape (one
    value per instance of a batch of problems); it is weighted elementwise."""
    if data is None:
        return objective(None)
    total: Tensor | None = None
    for batch, count in data.chunks():
        value = objective(batch) * (count / data.size)
        total = value if total is None else total + value
    assert total is not None, "a data stream holds at least one example"
    return total
