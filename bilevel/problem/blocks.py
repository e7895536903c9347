"""A lower level of m blocks under one shared upper level, k of them drawn per outer step.

Block i is a single-block problem compiled with its own data, objective arguments and initial
values (``blocks.vary``); stacked, the blocks are one problem whose lower variables carry a
leading block dimension while the upper variables are shared (Hu et al. 2023, ICML):

    G(x, Y) = sum_i g_i(x, y_i),        F(x, Y) = (1/m) sum_i f_i(x, y_i),

each evaluated with ``torch.func.vmap`` over the objective the user wrote (as for instances,
``bilevel.problem.stack``): grad_Y G, H and the mixed products are block diagonal, so the
implicit and unrolled engines solve every block at once, exactly as they would solve each alone.

**Sampling.** A :class:`BlockSampler` draws the k blocks of each outer step (at the start of the
step, with the upper level's ``begin_outer_step``); both levels' data streams then give the
batches of the drawn blocks only, and :func:`selected_blocks` is the problem over those k blocks
(their objective arguments, F the mean of their f_i), which an engine that samples blocks
evaluates on the rows Y[S] of its per-block state. The draws are seeded and checkpointed with
the upper level's data, so a resumed run draws the same blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.problem.problem import Problem
from bilevel.problem.stack import StackedInstances, _check_alike, _KwargsHolder, _stack_level, _template, vectorization
from bilevel.problem.stacked_data import StackedDataStream
from bilevel.spec.errors import SpecError

__all__ = ["BlockData", "BlockSampler", "selected_blocks", "stack_blocks"]


class BlockSampler:
    """The k of m blocks of the current outer step. ``shuffled``: passes over the blocks, each in
    a fresh random permutation, k consecutive entries per step (a pass of m not divisible by k
    ends with the rest of its permutation topped up from the next); ``uniform``: k distinct
    blocks at random per step. With k = m every step draws all blocks, in index order."""

    def __init__(self, count: int, sample: int, order: str, seed: int, device: torch.device):
        self.count, self.sample, self.order, self.device = count, sample, order, device
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []
        self.indices = torch.arange(count, device=device)
        """The current blocks (before the first step: all)."""

    @property
    def every_block(self) -> bool:
        return self.sample >= self.count

    def advance(self) -> Tensor:
        """Draw the blocks of the next outer step."""
        if self.every_block:
            return self.indices
        if self.order == "uniform":
            chosen = torch.randperm(self.count, generator=self.generator)[: self.sample].tolist()
        else:
            while len(self.queue) < self.sample:
                self.queue += [i for i in torch.randperm(self.count, generator=self.generator).tolist() if i not in self.queue]
            chosen, self.queue = self.queue[: self.sample], self.queue[self.sample :]
        self.indices = torch.tensor(sorted(chosen), device=self.device)
        return self.indices

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "queue": list(self.queue), "indices": self.indices.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.queue = list(state["queue"])
        self.indices = torch.tensor(state["indices"], device=self.device, dtype=torch.long)


class BlockData(StackedDataStream):
    """The blocks' data streams as one (``StackedDataStream``), giving batches of the drawn blocks
    only: ``next`` stacks the drawn blocks' batches (each drawn from its block's own stream, as
    alone), while ``full`` and ``chunks`` hold every block (for the final evaluation). The upper
    level's stream owns the sampler: its ``begin_outer_step`` draws the step's blocks, and its
    state holds the draws."""

    def __init__(self, streams: list[Any], sampler: BlockSampler, owner: bool):
        super().__init__(streams)
        self.sampler, self.owner = sampler, owner
        self.resampled = not sampler.every_block
        """A new subset of blocks every step: nothing captured from one step serves the next."""

    def next(self) -> dict[str, Tensor]:
        sampler = self.sampler
        if sampler.every_block:
            return super().next()
        index = sampler.indices
        if self.batch_size is None:
            return {name: t if self.in_dims[name] is None else t.index_select(0, index) for name, t in self._full.items()}
        batches = [self.streams[i].next() for i in index.tolist()]
        return {name: torch.stack([b[name] for b in batches]) for name in self.in_dims}

    def begin_outer_step(self) -> None:
        if self.owner:
            self.sampler.advance()
        if self.sampler.every_block:
            super().begin_outer_step()
        else:
            for i in self.sampler.indices.tolist():
                self.streams[i].begin_outer_step()

    def state_dict(self) -> dict[str, object]:
        state = super().state_dict()
        if self.owner:
            state["blocks"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.owner and "blocks" in state:
            self.sampler.load_state_dict(state["blocks"])


def stack_blocks(members: list[Problem], vary: Mapping[str, list[Any]], sampler: BlockSampler) -> Problem:
    """The blocks problem of the compiled single-block ``members`` (see the module docstring):
    block 0's upper level shared, the lower level stacked, both levels' data read through
    ``BlockData``; a SpecError names what does not agree between blocks."""
    first = members[0]
    source = first.source
    upper, lower = first.chain
    _check_alike(source, members)
    varying: dict[str, dict[str, Tensor]] = {}
    for path, values in vary.items():
        parts = path.split(".")
        if parts[0] == "levels" and parts[2] == "objective_kwargs":
            varying.setdefault(parts[1], {})[parts[3]] = torch.tensor(values, dtype=first.dtype, device=first.device)
    stacked_lower = _stack_level(lower.name, members)
    levels = {
        upper.name: dataclasses.replace(upper, data=_block_data(members, upper.name, sampler, owner=True)),
        lower.name: dataclasses.replace(stacked_lower, data=_block_data(members, lower.name, sampler, owner=False)),
    }
    if lower.constraints:
        raise SpecError([source.issue(f"levels.{lower.name}.constraints", "constraints on a level of blocks are not supported")])
    holder = _KwargsHolder()
    stacked = StackedInstances(members=members, template=_template(members, varying, holder), levels=levels,
                               varying_kwargs=varying, vary=dict(vary), holder=holder,
                               vectorize=vectorization(first.device, levels), kind="blocks", top_reduce="mean",
                               blocks=sampler)
    return Problem(first.name, levels, first.device, first.dtype, first.report, first.monitor, source=source,
                   memory_budget_mb=first.memory_budget_mb, engine=first.engine, fingerprint=first.fingerprint,
                   stacked=stacked)


def _block_data(members: list[Problem], name: str, sampler: BlockSampler, owner: bool) -> BlockData | None:
    streams = [m.levels[name].data for m in members]
    if streams[0] is None:
        return None
    return BlockData(streams, sampler, owner)


def selected_blocks(problem: Problem) -> Problem:
    """The problem over the blocks drawn for this step: its lower variables are the rows Y[S] of
    the full problem's, its data the drawn blocks' batches, F the mean of their f_i. With every
    block drawn, the problem itself."""
    stacked = problem.stacked
    assert stacked is not None and stacked.blocks is not None
    sampler = stacked.blocks
    if sampler.every_block:
        return problem
    index = sampler.indices
    varying = {level: {name: value.index_select(0, index) for name, value in kwargs.items()}
               for level, kwargs in stacked.varying_kwargs.items()}
    chosen = dataclasses.replace(stacked, varying_kwargs=varying, count_=int(index.numel()),
                                 members=[stacked.members[i] for i in index.tolist()])
    return dataclasses.replace(problem, stacked=chosen)
