"""Meta-learning over a distribution of tasks, as one stacked problem.

A task i has a support set S_i and a query set Q_i. The level below the top (variables phi) is
solved for every task of a meta-batch at once: its variables carry a leading task dimension, and
the meta-parameters theta upstairs are shared,

    G(theta, Phi) = sum_i G(theta, phi_i; S_i),      F(theta, Phi) = reduce_i F(theta, phi_i; Q_i),

each evaluated with ``torch.func.vmap`` over the single-task objectives the user wrote (theta
enters unbatched). The lower objective is a sum, so that each phi_i's gradient, Hessian and
optimizer step are its own task's (block diagonal, as for instances); the upper objective is
the mean (or sum) of the per-task query losses. Each outer step draws a new meta-batch from the
task stream: the upper level's batch is the query sets (drawn when the runtime asks for it, at
the start of the step), the lower level's the support sets of the same tasks.

Data-parallel runs split the meta-batch over the W ranks. Every rank draws the same meta-batch
(the same seeded stream) and holds every task's phi_i (the variables stay replicated, as in
``bilevel.distributed.reduce``), but rank r evaluates the objectives only on its contiguous slice
I_r = [start_r, stop_r) of the M tasks (``bilevel.distributed.shard.shard_bounds``: sizes
differing by at most one), with weight 1 instead of the replicated 1/W:

    G^(r)(theta, Phi) = sum_{i in I_r} G(theta, phi_i; S_i),
    F^(r)(theta, Phi) = (1/M) sum_{i in I_r} F(theta, phi_i; Q_i)      (reduce sum: without 1/M).

The slices partition the tasks, so sum_r G^(r) = G and sum_r F^(r) = F exactly, for any per-task
objectives; grad_{phi_i} G^(r) is zero for the tasks outside I_r, so the gradients, Hessian-vector
and mixed products the engines sum over ranks are the full ones (each task's block from the rank
that holds it). A rank's vmap runs over M / W tasks; what travels is the all-reduce of each
gradient or product of the whole (theta, Phi), as for sharded data. This requires M >= W
(``bilevel.compile.checks.task_issues``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.problem.problem import Problem
from bilevel.problem.stack import StackedInstances, _KwargsHolder
from bilevel.spec.errors import SpecError, SpecSource

__all__ = ["TEST_SEED_OFFSET", "TaskData", "TaskSetup", "TaskStream", "check_task_batch", "stack_tasks"]

Sampler = Callable[..., Mapping[str, Mapping[str, Tensor]]]
TEST_SEED_OFFSET = 1_000_003
"""Meta-test tasks are drawn from seed + this, never from the meta-training stream."""


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """The compiled ``tasks`` of a spec: the samplers, the meta-test settings and the metrics."""

    sampler: Sampler
    kwargs: Mapping[str, Any]
    meta_batch: int
    seed: int
    reduce: str
    test_sampler: Sampler
    test_kwargs: Mapping[str, Any]
    test_tasks: int
    test_steps: tuple[int, ...] | None
    metrics: Callable[..., Mapping[str, Tensor]] | None


def check_task_batch(raw: Any, count: int, ref: str) -> str | None:
    """Why a sampler's output is not a meta-batch of ``count`` tasks (None when it is)."""
    if not isinstance(raw, Mapping) or set(raw) != {"support", "query"}:
        got = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        return f"{ref} returned {got}, expected a mapping with the keys 'query' and 'support'"
    for part in ("support", "query"):
        sets = raw[part]
        if not isinstance(sets, Mapping) or not sets or not all(isinstance(v, Tensor) for v in sets.values()):
            return f"{ref} returned {part} of type {type(sets).__name__}, expected a non-empty mapping name -> Tensor"
        shapes = {name: list(v.shape) for name, v in sets.items()}
        if any(v.dim() < 2 or v.shape[0] != count for v in sets.values()):
            return (f"{ref}'s {part} tensors must have a leading dimension of {count} tasks and one of examples"
                    f" (got shapes {shapes})")
        if len({v.shape[1] for v in sets.values()}) != 1:
            return f"{ref}'s {part} tensors must have the same number of examples per task (got shapes {shapes})"
    if set(raw["support"]) != set(raw["query"]):
        return (f"{ref} returned support with {sorted(raw['support'])} and query with {sorted(raw['query'])}:"
                " support and query sets must have the same names")
    return None


class TaskStream:
    """Meta-batches of ``count`` tasks drawn by a sampler with a seeded generator (on the host:
    tasks are small), moved to the problem's device and dtype. ``current`` is the last meta-batch."""

    def __init__(self, sampler: Sampler, kwargs: Mapping[str, Any], count: int, seed: int,
                 device: torch.device, dtype: torch.dtype, ref: str = "tasks.sampler"):
        self.sampler, self.kwargs, self.count = sampler, dict(kwargs), count
        self.device, self.dtype, self.ref = device, dtype, ref
        self.generator = torch.Generator().manual_seed(seed)
        self.current: dict[str, dict[str, Tensor]] | None = None

    def sample(self) -> dict[str, dict[str, Tensor]]:
        raw = self.sampler(self.count, self.generator, **self.kwargs)
        problem = check_task_batch(raw, self.count, self.ref)
        if problem is not None:
            raise ValueError(problem)
        self.current = {part: {name: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                               for name, v in raw[part].items()} for part in ("support", "query")}
        return self.current

    def batch(self, part: str) -> dict[str, Tensor]:
        return (self.current or self.sample())[part]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.current = None


class TaskData:
    """One level's view of the task stream, in place of its data stream: the top level's batch
    is the query sets of a new meta-batch (``next`` draws it), the lower level's the support sets
    of the current one."""

    batch_size = None
    resampled = True
    """Every outer step brings new tasks: nothing captured from one step serves the next."""

    def __init__(self, stream: TaskStream, part: str):
        self.stream, self.part = stream, part

    def next(self) -> dict[str, Tensor]:
        return self.stream.sample()[self.part] if self.part == "query" else self.stream.batch(self.part)

    @property
    def full(self) -> dict[str, Tensor]:
        return self.stream.batch(self.part)

    @property
    def data(self) -> dict[str, Tensor]:
        return self.full

    @property
    def size(self) -> int:
        return next(iter(self.full.values())).shape[1]

    @property
    def in_dims(self) -> dict[str, int]:
        return {name: 0 for name in self.full}

    def chunks(self) -> Iterator[tuple[dict[str, Tensor], int]]:
        """The current meta-batch (the final evaluation's: the tasks the last step saw)."""
        yield self.full, self.size

    def example_numel(self) -> int:
        """Scalars of one example of every task together (the planner's memory estimate)."""
        return sum(v[:, 0].numel() for v in self.full.values())

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict() if self.part == "query" else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.part == "query":
            self.stream.load_state_dict(state)


def stack_tasks(problem: Problem, stream: TaskStream, setup: TaskSetup, source: SpecSource) -> Problem:
    """The meta-batch problem of a single-task ``problem`` (see the module docstring): the level
    below the top stacked over the stream's tasks, both levels reading the stream."""
    if problem.depth != 2:
        raise source.error("tasks", f"tasks need a bilevel problem (the task level below the top); this one has {problem.depth} levels")
    upper, lower = problem.chain
    init = tuple(p.unsqueeze(0).expand(stream.count, *p.shape).clone() for p in lower.init)
    # weight 1 on every rank: a data-parallel rank's part is its slice of the tasks (module docstring)
    levels = {
        upper.name: dataclasses.replace(upper, data=TaskData(stream, "query"), share=1.0),
        lower.name: dataclasses.replace(lower, init=init, data=TaskData(stream, "support"), stacked=True, constraints=(),
                                        share=1.0),
    }
    template = dataclasses.replace(problem, levels={upper.name: dataclasses.replace(upper, data=None, share=1.0),
                                                   lower.name: dataclasses.replace(lower, data=None, share=1.0)})
    stacked = StackedInstances(members=[], template=template, levels=levels, holder=_KwargsHolder(), vectorize="vmap",
                               kind="tasks", count_=stream.count, top_reduce=setup.reduce, tasks=setup)
    if lower.constraints:
        raise SpecError([source.issue(f"levels.{lower.name}.constraints", "constraints on the task level are not supported")])
    return dataclasses.replace(problem, levels=levels, stacked=stacked)
