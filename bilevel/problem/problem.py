"""The compiled problem: what engines see.

A problem is a tree of levels under one top level z_0 (the upper level, variables x); a bilevel
problem is the tree of two levels, with y = z_1, and a chain z_0 -> z_1 -> ... -> z_{K-1} the
tree in which every level has one child. Level k >= 1 is solved given its ancestors; every level
with children minimizes its objective with its descendants at their solutions
(docs/concepts.md, docs/howto/multilevel.md, docs/howto/trees-and-blocks.md):

    phi_k(ancestors, z_k) = f_k(ancestors, z_k, z*_c(ancestors, z_k) for every descendant c),
    z*_k = argmin_{z_k} phi_k,

so the hypergradient of a level is the sum of its children's contributions.

**What an objective sees.** f_k is called as ``f(upper, lower, batch)`` with ``upper`` holding the
variables of k's ancestors and ``lower`` those of k and of its descendants (not its siblings'
subtrees). The top level has nothing above it; its objective gets its own variables in
``upper`` and all the others in ``lower``. So the top level and a level just below it see the
same split, and a two-level spec reads the same in any tree. Levels are indexed in preorder
(``chain``: the top first, each level before its descendants, children in declaration order).

Engines work on flat tuples of tensors. ``x`` is the top level's tuple; ``y`` is ``lower``'s:
for depth 2 the lower level itself, deeper the levels below the top presented as one
:class:`~bilevel.problem.level.Level` (their variables in chain order), so that views, warm
starts, checkpoints, monitors and reports work at every depth. ``params`` is the list of every
level's tuple, top first. A batch of independent instances is the same type, with stacked
variables and objectives summed over the instances (``bilevel.problem.stack``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bilevel.hyperparameters import Drawn
from bilevel.problem.level import Level, Params, VariableView, merge_levels
from bilevel.problem.tree import LevelTree
from bilevel.spec.errors import SpecSource

if TYPE_CHECKING:
    from bilevel.problem.stack import StackedInstances

__all__ = ["Problem"]


@dataclass
class Problem(LevelTree):
    """A compiled problem on a device and dtype (see the module docstring). In a data-parallel
    run each objective returns this rank's share of the union objective (``Level.share``);
    engines never see the difference."""

    name: str
    levels: dict[str, Level]
    """Levels by name; their ``parent`` fields make the chain."""
    device: torch.device
    dtype: torch.dtype
    report: Callable[..., Mapping[str, Any]] | None = None
    """report(upper_view, lower_view, out_dir=...) -> numbers for result.json."""
    monitor: Callable[..., Mapping[str, Any] | None] | None = None
    """monitor(upper_view, lower_view, step=..., out_dir=...) -> numbers for metrics.jsonl."""
    source: SpecSource = field(default_factory=SpecSource)
    """The spec's file and lines, for messages about the problem after it is compiled."""
    memory_budget_mb: float | None = None
    """The declared memory budget (run.budget.memory_mb); None: the planner's default for the device."""
    engine: Any = None
    """The engine the spec asks for (an engine config; auto or None: the planner chooses)."""
    fingerprint: str = ""
    """A digest of everything in the spec that determines the computation (not run lengths or
    outputs): a checkpoint resumes only a run of the same fingerprint."""
    stacked: StackedInstances | None = None
    """Independent copies stacked along a leading dimension (None: one problem): a batch of
    instances (every level stacked), or a meta-batch of tasks (the levels below the top stacked,
    the top shared; ``bilevel.problem.tasks``)."""

    @functools.cached_property
    def upper(self) -> Level:
        """The top level (variables x, objective F)."""
        return self.chain[0]

    @functools.cached_property
    def lower(self) -> Level:
        """Every level below the top as one Level: the lower level itself for depth 2."""
        below = self.chain[1:]
        return below[0] if len(below) == 1 else merge_levels(below, "+".join(level.name for level in below))

    @functools.cached_property
    def bottom_pair(self) -> Problem:
        """``pair`` of the last level of the chain (the bottom of a chain)."""
        return self.pair(len(self.chain) - 1)

    def pair(self, k: int) -> Problem:
        """Level k (a leaf) as the lower level of a two-level problem whose upper level merges its
        ancestors: its ``lower_objective(flat ancestors, z_k, batch)`` is f_k, so the shared inner
        loop (bilevel/engines/inner.py) solves level k."""
        if self.depth == 2:
            return self
        cache = self.__dict__.setdefault("_pairs", {})
        if k not in cache:
            above_levels = [self.chain[a] for a in self.ancestors(k)]
            above = merge_levels(above_levels, "+".join(level.name for level in above_levels))
            leaf = dataclasses.replace(self.chain[k], parent=above.name)
            cache[k] = Problem(self.name, {above.name: above, leaf.name: leaf}, self.device, self.dtype, source=self.source)
        return cache[k]

    @property
    def instances(self) -> int | None:
        """The number of independent lower problems stacked, instances or tasks (None for one
        problem): engines keep them apart in every reduction (CG's inner products)."""
        return None if self.stacked is None else self.stacked.count

    @property
    def instance_batch(self) -> bool:
        """A batch of instances (every level stacked; results per instance)."""
        return self.stacked is not None and self.stacked.kind == "instances"

    @property
    def resamples_tasks(self) -> bool:
        """A meta-batch of tasks drawn anew at every outer step (so no lower warm start across steps)."""
        return self.stacked is not None and self.stacked.kind == "tasks"

    @property
    def blocks(self) -> Any:
        """The block draws of a lower level of blocks (``bilevel.problem.blocks.BlockSampler``), or None."""
        return None if self.stacked is None else self.stacked.blocks

    def split(self, y: Sequence[Tensor]) -> list[Params]:
        """``lower``'s flat tuple, one tuple per level below the top."""
        out, start = [], 0
        for level in self.chain[1:]:
            out.append(tuple(y[start : start + len(level.init)]))
            start += len(level.init)
        return out

    @staticmethod
    def join(params: Sequence[Sequence[Tensor]]) -> Params:
        """Per-level tuples concatenated into one flat tuple."""
        return tuple(p for level in params for p in level)

    def starts(self, first: int, previous: Sequence[Params]) -> list[Params]:
        """Where the next solves of levels first, first + 1, ... (in preorder) start: their
        ``previous`` solutions where their solver warm-starts, else their initial values."""
        return [p if level.solver.warm_start else self.fresh(level.init) for level, p in zip(self.chain[first:], previous)]

    def start(self, k: int, previous: Params) -> Params:
        """Where the next solve of level k starts (see ``starts``)."""
        level = self.chain[k]
        return previous if level.solver.warm_start else self.fresh(level.init)

    # --- objectives -----------------------------------------------------------------------------
    def views(self, k: int, params: Sequence[Sequence[Tensor]], drawn: Mapping[str, Drawn] | None = None
              ) -> tuple[VariableView, VariableView]:
        """(upper, lower) as level k's objective sees them; ``drawn`` replaces some of the top
        level's values (an engine's perturbation, e.g. STN's)."""
        above = (0,) if k == 0 else self.ancestors(k)
        below = tuple(range(1, len(self.chain))) if k == 0 else self.subtree(k)
        sides = tuple([(self.chain[j], params[j], drawn if j == 0 else None) for j in side] for side in (above, below))
        return _view(sides[0]), _view(sides[1])

    def objective(self, k: int, params: Sequence[Sequence[Tensor]], batch: Any, drawn: Mapping[str, Drawn] | None = None) -> Tensor:
        """f_k on a batch of level k's data, plus the weight decay wd/2 ||z_k||^2 of level k's
        solver when declared (k >= 1); this rank's share of it under data parallelism. For a
        batch of instances: the sum over the instances."""
        if self.stacked is not None:
            return self.stacked.objective(k, params, batch, drawn)
        level = self.chain[k]
        upper, lower = self.views(k, params, drawn)
        value = level.objective(upper, lower, batch)
        if level.prox is not None:
            value = value + level.prox.value(params[k], params[self.parents[k]])
        solver = level.solver
        if k == 0 or solver is None or (solver.weight_decay == 0.0 and "weight_decay" not in solver.tuned):
            return level.shared(value)
        decay = upper[solver.tuned["weight_decay"]] if "weight_decay" in solver.tuned else solver.weight_decay
        return level.shared(value + 0.5 * decay * sum((p * p).sum() for p in params[k]))

    def upper_objective(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any, drawn: Mapping[str, Drawn] | None = None) -> Tensor:
        """F(x, y) on an upper batch (``drawn``: upper values an engine substitutes)."""
        return self.objective(0, [tuple(x), *self.split(y)], batch, drawn)

    def upper_losses(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any) -> Tensor:
        """F on a batch: a scalar, or the instances' F_k (shape (N,)) for a batch of instances."""
        if not self.instance_batch:
            return self.upper_objective(x, y, batch)
        return self.stacked.per_instance(0, [tuple(x), *self.split(y)], batch)

    def lower_objective(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any, drawn: Mapping[str, Drawn] | None = None) -> Tensor:
        """G(x, y) on a lower batch, plus the inner solver's weight decay wd/2 ||y||^2 when
        declared. Depth 2 only: deeper, each level has its own objective (``objective``)."""
        if self.depth != 2:
            raise TypeError(
                f"{self.name!r} has {self.depth} levels ({' -> '.join(self.level_names)}): two-level engines do not apply;"
                " use an engine that declares more than two levels (implicit or unrolled)"
            )
        return self.objective(1, [tuple(x), tuple(y)], batch, drawn)

    def initial_lower(self, x: Sequence[Tensor]) -> Params:
        """Where a solve of the lower level starts: its initial values, with the variables it
        declares ``init_from`` taken from x (broadcast over a batch of tasks), differentiable in x."""
        lower = self.lower
        start = list(self.fresh(lower.init))
        for i, j in lower.init_from:
            start[i] = x[j].expand_as(start[i]) if lower.stacked and not self.upper.stacked else x[j]
        return tuple(start)

    def tuned_hyperparameters(self, x: Sequence[Tensor], tuned: Mapping[str, str]) -> dict[str, Any]:
        """Optimizer hyperparameter -> the current value of the upper variable it is tuned by: a
        0-d tensor, or for a per-entry learning rate (Meta-SGD) one tensor per lower variable."""
        if not tuned:
            return {}
        upper = self.upper.view(x)
        out: dict[str, Any] = {}
        for name, variable in tuned.items():
            value = upper[variable]
            if callable(value) and not isinstance(value, Tensor):  # a module of per-parameter learning rates
                out[name] = tuple(value.params.values())
            elif value.numel() == 1:
                out[name] = value.reshape(())
            else:
                out[name] = (value,)
        return out

    def hyperparameters(self, k: int, above: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
        """Level k's tuned optimizer hyperparameters (lr, momentum), read from its ancestors'
        values ``above`` (in the order of ``ancestors(k)``)."""
        tuned = {name: var for name, var in self.chain[k].solver.tuned.items() if name != "weight_decay"}
        if not tuned:
            return {}
        values: dict[str, Any] = {}
        for a, p in zip(self.ancestors(k), above):
            values.update(self.chain[a].items(p))
        return {name: _tuned_value(values[var]) for name, var in tuned.items()}

    def constraint_values(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any) -> tuple[Tensor, ...]:
        """Each lower constraint's values at (x, y), flattened (feasible where <= 0 / == 0); for a
        batch of instances, every instance's values, instance-major."""
        if self.stacked is not None and self.lower.constraints:
            return self.stacked.constraint_values(x, y, batch)
        upper, lower = self.upper.view(x), self.lower.view(y)
        return tuple(c.fn(upper, lower, batch).reshape(-1) for c in self.lower.constraints)

    def fresh(self, params: Params, requires_grad: bool = False) -> Params:
        """Detached copies of ``params`` (leaves; requiring grad when asked)."""
        return tuple(p.detach().clone().requires_grad_(requires_grad) for p in params)


def _tuned_value(value: Tensor) -> Tensor:
    """A tuned hyperparameter's value: a scalar, or the K entries of a schedule (solver.tuned_schedule)."""
    return value.reshape(()) if value.numel() == 1 else value.reshape(-1)


def _view(parts: list[tuple[Level, Sequence[Tensor], Any]]) -> VariableView:
    """One view of several levels' variables (each with its own drawn values)."""
    if len(parts) == 1:
        level, values, drawn = parts[0]
        return level.view(values, drawn)
    items: dict[str, Any] = {}
    for level, values, drawn in parts:
        items.update(level.items(values, drawn))

    def codes() -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for level, values, drawn in parts:
            out.update(level.codes(values, drawn))
        return out

    return VariableView(items, codes)
