"""A lower level declared as many blocks under one upper level (multi-block bilevel optimization,
docs/howto/trees-and-blocks.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from bilevel.spec._base import SpecModel
from bilevel.spec.instances import VARYING_PATHS

__all__ = ["BlocksSpec"]

BLOCK_INDEX = "index"
"""A ``vary`` entry given as this string takes the block's index 0, 1, ..., count - 1."""


class BlocksSpec(SpecModel):
    """``count`` blocks of this lower level, sharing the upper variables: block i has its own
    lower variables y_i, its own data and objective arguments (``vary``), and its own warm-started
    solution, and the upper objective is the mean of the blocks' upper objectives,

        min_x F(x) = (1/m) sum_i f_i(x, y_i*(x)),   y_i*(x) = argmin_y g_i(x, y)

    (Hu et al. 2023, "Blockwise Stochastic Variance-Reduced Methods with Parallel Speedup for
    Multi-Block Bilevel Optimization", ICML). With ``sample`` below ``count`` only ``sample``
    blocks are drawn and updated at each outer step (an engine that samples blocks: bsvrb); with
    every block sampled the problem is one batched problem, which the implicit and unrolled engines
    solve exactly as a batch of instances with a shared upper level."""

    count: Annotated[int, Field(ge=1)]
    """m: the number of blocks."""
    sample: Annotated[int, Field(ge=1)] | None = None
    """k: blocks drawn and updated per outer step (None: all m, no sampling)."""
    order: Literal["shuffled", "uniform"] = "shuffled"
    """How blocks are drawn: shuffled (each pass over the m blocks in a fresh random order, k at a
    time, as the paper's official code does) or uniform (k distinct blocks at random every step)."""
    seed: int | None = None
    """Seed of the block draws (None: run.seed)."""
    vary: dict[str, list[Any] | Literal["index"]] = Field(default_factory=dict)
    """Dotted path in this spec -> one value per block, or "index" for the block's index
    (0, ..., m - 1), e.g. {"levels.head.data.kwargs.task": "index"}. Allowed paths: those of
    ``instances.vary`` (data-source arguments, numeric objective arguments, initial values of the
    lower level's variables, report and monitor arguments), except run.seed; block i's random
    initial values use run.seed + i."""

    @field_validator("sample")
    @classmethod
    def _sample_within_count(cls, value: int | None, info: ValidationInfo) -> int | None:
        count = info.data.get("count")
        if value is not None and count is not None and value > count:
            raise ValueError(f"sample = {value} blocks per step exceeds count = {count} blocks")
        return value

    @field_validator("vary")
    @classmethod
    def _check_vary(cls, vary: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        count = info.data.get("count")
        for path, values in vary.items():
            if path == "run.seed" or not any(re.fullmatch(pattern, path) for pattern, _ in VARYING_PATHS):
                allowed = "; ".join(d for p, d in VARYING_PATHS if p != r"run\.seed")
                raise ValueError(f"vary: {path!r} cannot differ between blocks (allowed: {allowed})")
            if values == BLOCK_INDEX:
                continue
            if count is not None and len(values) != count:
                raise ValueError(f"vary: {path!r} has {len(values)} values, expected one per block ({count}) or \"index\"")
            if ".objective_kwargs." in path and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"vary: {path!r} must list numbers (objective arguments become per-block tensors)")
        return vary

    @property
    def drawn(self) -> int:
        """k: blocks per outer step."""
        return self.count if self.sample is None else self.sample

    @property
    def sampled(self) -> bool:
        """Fewer blocks than all are drawn per step."""
        return self.drawn < self.count

    def values(self, path: str) -> list[Any]:
        """The per-block values of a ``vary`` entry ("index" expanded)."""
        values = self.vary[path]
        return list(range(self.count)) if values == BLOCK_INDEX else list(values)
