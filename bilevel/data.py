"""Minibatch streams over a level's data, sampled on the device without host synchronization."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["DataStream"]


class DataStream:
    """Epochs of shuffled minibatches over a mapping name -> Tensor (equal first dimensions).

    With ``batch_size=None`` every batch is the whole data set (deterministic, no indexing cost).
    Shuffling uses a seeded generator, so a resumed run draws the same batches. The generator
    lives on the data's device: on CUDA the permutation is drawn there (no host round trip, which
    would synchronize), so the batch sequence of a seed differs between CPU and CUDA runs."""

    def __init__(self, data: Mapping[str, Tensor], batch_size: int | None, seed: int):
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

    @property
    def full(self) -> dict[str, Tensor]:
        """The whole data set as one batch."""
        return self.data

    def next(self) -> dict[str, Tensor]:
        """The next minibatch (the whole set when batch_size is None)."""
        if self.batch_size is None:
            return self.data
        if self._perm is None or self._cursor + self.batch_size > self.size:
            self._perm = torch.randperm(self.size, generator=self._generator, device=self._generator.device).to(self._device)
            self._cursor = 0
        index = self._perm[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
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
