"""A compiled problem whose levels form a chain of three or more: top -> middle ... -> bottom.

Level k (from 0 at the top) has variables z_k and objective f_k. The bottom level solves
min_{z_{K-1}} f_{K-1}(z_0, ..., z_{K-1}); every level above it, given the levels above it,
minimizes its objective with the levels below at their solutions:

    phi_k(z_0..z_k) = f_k(z_0, ..., z_k, z*_{k+1}(z_0..z_k), z*_{k+2}(...), ...),
    z*_k(z_0..z_{k-1}) = argmin_{z_k} phi_k,        the top level minimizes phi_0(z_0).

**What an objective sees.** f_k is called as ``f(upper, lower, batch)`` with the chain split at
level k: ``upper`` holds the variables of the levels above k, ``lower`` those of level k and of
every level below it. The top level has nothing above it; its objective, as in a two-level
problem, gets its own variables in ``upper`` and all the others in ``lower``. So the top level
and the level just below it see the same split, and a two-level spec reads exactly as before.

The runtime sees the chain as two levels: ``upper`` is the top level, ``lower`` presents every
level below it as one :class:`Level` (their variables in chain order), so that views, warm
starts, checkpoints, monitors and reports work unchanged. ``lower_objective`` has no meaning for
a chain: the multilevel engines evaluate each level through :meth:`ChainProblem.objective`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import Tensor

from bilevel.problem import Level, ModuleBinding, Params, Problem, VariableView

__all__ = ["ChainProblem", "merge_levels"]


def _no_objective(upper: Any, lower: Any, batch: Any) -> Tensor:
    raise TypeError("a merged view of several levels has no objective of its own; evaluate each level"
                    " with ChainProblem.objective(k, params, batch)")


def merge_levels(levels: Sequence[Level], name: str) -> Level:
    """Several levels presented as one: their flat variables concatenated in order, their views
    merged (variable names are unique across a problem)."""
    tensors: dict[str, int] = {}
    modules: dict[str, ModuleBinding] = {}
    names: list[str] = []
    init: list[Tensor] = []
    sets: list[Any] = []
    for level in levels:
        offset = len(init)
        tensors.update({v: i + offset for v, i in level.tensors.items()})
        modules.update({v: ModuleBinding(b.module, b.param_names, b.start + offset) for v, b in level.modules.items()})
        names.extend(level.param_names)
        init.extend(level.init)
        sets.extend(level.sets or (None,) * len(level.init))
    return Level(name=name, param_names=tuple(names), init=tuple(init), objective=_no_objective,
                 tensors=tensors, modules=modules, sets=tuple(sets))


@dataclass
class ChainProblem(Problem):
    """A compiled chain of levels (see the module docstring for the semantics). ``compile_spec``
    builds one for three or more levels; a chain of two is the two-level problem.

    ``chain`` holds the levels from the top down. Per-level parameters are passed around as a
    list ``params`` with ``params[k]`` the flat tuple of level k."""

    chain: tuple[Level, ...] = ()
    _below: Level = field(init=False, repr=False)
    _bottom_pair: Problem = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.chain) < 2:
            raise ValueError("a chain needs at least two levels")
        self._below = merge_levels(self.chain[1:], "+".join(level.name for level in self.chain[1:]))
        above = merge_levels(self.chain[:-1], "+".join(level.name for level in self.chain[:-1]))
        bottom = self.chain[-1]
        graph = nx.DiGraph([(above.name, bottom.name)])
        self._bottom_pair = Problem(self.name, {above.name: above, bottom.name: bottom}, graph, self.device, self.dtype)

    # --- the runtime's two-level picture -----------------------------------------------------
    @property
    def lower(self) -> Level:
        """Every level below the top, presented as one Level (variables in chain order)."""
        return self._below

    def lower_objective(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any) -> Tensor:
        raise TypeError(
            f"{self.name!r} has {self.depth} levels ({' -> '.join(self.level_names)}): two-level engines do not apply;"
            " use a multilevel engine (bilevel.multilevel: implicit or unrolled)"
        )

    # --- levels ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.chain)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.chain)

    @property
    def bottom_pair(self) -> Problem:
        """The bottom level as the lower level of a two-level Problem whose upper level merges
        all the levels above it: its ``lower_objective(flat above, bottom, batch)`` is
        f_{K-1}, so the shared inner loop (bilevel/engines/inner.py) solves the bottom level."""
        return self._bottom_pair

    def split(self, y: Sequence[Tensor]) -> list[Params]:
        """The flat variables of the levels below the top (``lower``'s layout), one tuple per level."""
        out, start = [], 0
        for level in self.chain[1:]:
            out.append(tuple(y[start : start + len(level.init)]))
            start += len(level.init)
        return out

    @staticmethod
    def join(params: Sequence[Sequence[Tensor]]) -> Params:
        """Per-level tuples concatenated into one flat tuple."""
        return tuple(p for level in params for p in level)

    def views(self, k: int, params: Sequence[Sequence[Tensor]]) -> tuple[VariableView, VariableView]:
        """(upper, lower) as level k's objective sees them; ``params`` holds every level's variables."""
        split = max(k, 1)
        upper: dict[str, Any] = {}
        lower: dict[str, Any] = {}
        for index, (level, values) in enumerate(zip(self.chain, params)):
            (upper if index < split else lower).update(level.items(values))
        return VariableView(upper), VariableView(lower)

    def objective(self, k: int, params: Sequence[Sequence[Tensor]], batch: Any) -> Tensor:
        """f_k on a batch of level k's data, plus the weight decay wd/2 ||z_k||^2 of level k's
        solver when declared (k >= 1; as ``Problem.lower_objective`` adds it for two levels)."""
        level = self.chain[k]
        upper, lower = self.views(k, params)
        value = level.objective(upper, lower, batch)
        solver = level.solver
        if k == 0 or solver is None or (solver.weight_decay == 0.0 and "weight_decay" not in solver.tuned):
            return value
        decay = upper[solver.tuned["weight_decay"]] if "weight_decay" in solver.tuned else solver.weight_decay
        return value + 0.5 * decay * sum((p * p).sum() for p in params[k])

    def hyperparameters(self, k: int, above: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
        """Level k's tuned optimizer hyperparameters (lr, momentum), read from the levels above."""
        tuned = {name: var for name, var in self.chain[k].solver.tuned.items() if name != "weight_decay"}
        if not tuned:
            return {}
        values: dict[str, Any] = {}
        for level, p in zip(self.chain[:k], above):
            values.update(level.items(p))
        return {name: values[var].reshape(()) for name, var in tuned.items()}

    def starts(self, first: int, previous: Sequence[Params]) -> list[Params]:
        """Where the next solves of levels first, first + 1, ... start: their ``previous``
        solutions where their solver warm-starts, else their initial values."""
        return [p if level.solver.warm_start else self.fresh(level.init) for level, p in zip(self.chain[first:], previous)]
