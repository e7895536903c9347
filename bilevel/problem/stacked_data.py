"""The data of a batch of instances as one stream (``bilevel.problem.stack``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.data import DataStream, iter_chunks

__all__ = ["StackedDataStream"]


class StackedDataStream:
    """The instances' data streams as one: batches are mappings of stacked tensors (leading
    dimension N) or, for full batches of data every instance shares, the shared tensor itself;
    ``in_dims`` says which (0 or None, per name), for vmap. Instance k draws its minibatches from
    its own stream (its own seed), exactly as it would alone."""

    def __init__(self, streams: list[DataStream]):
        self.streams = streams
        first = streams[0]
        self.batch_size = first.batch_size
        self.size = first.size
        names = list(first.full)
        shared = {
            name: all(s.full[name].shape == first.full[name].shape and torch.equal(s.full[name], first.full[name]) for s in streams[1:])
            for name in names
        }
        full: dict[str, Tensor] = {}
        for name in names:
            if shared[name]:
                full[name] = first.full[name]
            else:
                full[name] = torch.stack([s.full[name] for s in streams])
                for index, stream in enumerate(streams):  # the members read views, no second copy
                    stream.data[name] = full[name][index]
        n = len(streams)
        if self.batch_size is None:
            self.in_dims: dict[str, int | None] = {name: None if shared[name] else 0 for name in names}
            self._full = full
        else:  # minibatches: each instance draws its own indices, so every batch tensor is stacked
            self.in_dims = {name: 0 for name in names}
            self._full = {name: t.unsqueeze(0).expand(n, *t.shape) if shared[name] else t for name, t in full.items()}
        self.shared = shared

    @property
    def full(self) -> dict[str, Tensor]:
        return self._full

    def chunks(self) -> Iterator[tuple[dict[str, Tensor], int]]:
        """The instances' whole data sets in consecutive batches along the example dimension (as
        ``DataStream.chunks``, every batch stacked); the full batch when there is no batch size."""
        yield from iter_chunks(self._full, self.size, self.batch_size, dim=1)

    @property
    def data(self) -> dict[str, Tensor]:
        return self._full

    def next(self) -> dict[str, Tensor]:
        if self.batch_size is None:
            return self._full
        batches = [s.next() for s in self.streams]
        return {name: torch.stack([b[name] for b in batches]) for name in self.in_dims}

    def begin_outer_step(self) -> None:
        for stream in self.streams:
            stream.begin_outer_step()

    def example_numel(self) -> int:
        """Scalars of one example of all instances together (the planner's memory estimate)."""
        n = len(self.streams)
        return sum(t[0].numel() * n for t in self.streams[0].full.values())

    def state_dict(self) -> dict[str, object]:
        return {"members": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for stream, saved in zip(self.streams, state["members"]):
            stream.load_state_dict(saved)
