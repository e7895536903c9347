"""A compiled level: its variables as a flat tuple of tensors, their presentation to user code,
its objective, data, solver and declared facts.

Engines work on flat tuples of tensors (``Params``). A :class:`Level` knows how to present such
a tuple to user code as a :class:`VariableView` (tensors by name, modules as functional
callables); the :class:`~bilevel.problem.Problem` decides which levels an objective sees."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.data import DataStream
from bilevel.hyperparameters import IDENTITY, Drawn, VariableTransform
from bilevel.linalg.project import project_simplex
from bilevel.prox import Prox
from bilevel.spec.constraints import BoxSet, SimplexSet
from bilevel.spec.level import Assumptions, OptimizerSpec

__all__ = ["Constraint", "Level", "ModuleBinding", "Params", "Prox", "ProximalTerm", "VariableView", "merge_levels", "project_onto"]

Params = tuple[Tensor, ...]
"""A level's variables as a flat tuple of tensors, in the order of Level.param_names."""


@dataclass(frozen=True)
class ModuleBinding:
    """A module variable: the module and the slice of the flat parameters that belong to it."""

    module: nn.Module
    param_names: tuple[str, ...]  # the module's own parameter names
    start: int  # index of the first of its tensors in the level's flat tuple


class _FunctionalModule:
    __slots__ = ("_module", "_params")

    def __init__(self, module: nn.Module, params: dict[str, Tensor]):
        self._module = module
        self._params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._module, self._params, args, kwargs)

    @property
    def params(self) -> dict[str, Tensor]:
        """The current parameters by the module's own names."""
        return self._params


class VariableView(Mapping[str, Any]):
    """Read-only access by name to the current values of some levels' variables.

    A tensor variable is a Tensor (a hyperparameter variable: its value in the declared units);
    a module variable is a callable running the module functionally on the current parameters
    (``view["net"](x)``)."""

    __slots__ = ("_items", "_codes")

    def __init__(self, items: dict[str, Any], codes: Callable[[], dict[str, Tensor]] | None = None):
        self._items = items
        self._codes = codes

    def codes(self) -> dict[str, Tensor]:
        """Each tensor variable's value as a flat encoding, in declaration order: what a model
        conditioned on the hyperparameters receives (see ``bilevel.hyperparameters``; under STN,
        the perturbed values the engine drew). ``bilevel.stn.hyper_input`` concatenates them."""
        return {} if self._codes is None else self._codes()

    def __getitem__(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"no variable {name!r}; available: {', '.join(sorted(self._items))}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_items":  # not set yet (copy, pickle, tracing): no recursion
            raise AttributeError(name)
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"VariableView({', '.join(self._items)})"


@dataclass(frozen=True)
class Constraint:
    """A compiled lower-level constraint c(upper, lower, batch): <= 0 or == 0 elementwise."""

    fn: Callable[[VariableView, VariableView, Any], Tensor]
    kind: str  # "inequality" | "equality"
    coupled: bool
    affine: bool
    path: str  # dotted path in the spec, for messages

    @property
    def is_equality(self) -> bool:
        return self.kind == "equality"


@dataclass(frozen=True)
class ProximalTerm:
    """A compiled proximal term lam/2 ||y - anchor||^2: (lower index, upper index) pairs of the
    flat tuples it ties together."""

    lam: float
    pairs: tuple[tuple[int, int], ...]

    def value(self, y: Sequence[Tensor], anchor: Sequence[Tensor]) -> Tensor:
        return 0.5 * self.lam * sum(((y[i] - anchor[j]) ** 2).sum() for i, j in self.pairs)


@dataclass
class Level:
    """A compiled level: flat parameters, their presentation to user code, objective, data, solver."""

    name: str
    param_names: tuple[str, ...]
    init: Params
    objective: Callable[[VariableView, VariableView, Any], Tensor]
    tensors: dict[str, int] = field(default_factory=dict)  # tensor variable -> index in the flat tuple
    modules: dict[str, ModuleBinding] = field(default_factory=dict)
    data: DataStream | None = None
    solver: OptimizerSpec | None = None
    assumptions: Assumptions = field(default_factory=Assumptions)
    sets: tuple[BoxSet | SimplexSet | None, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    solution: Callable[[VariableView, VariableView, Any], Mapping[str, Tensor]] | None = None
    """Closed-form minimizer of the objective, solution(upper, lower, batch) -> name -> Tensor
    (tensor variables only); None: the inner solver's steps find it."""
    parent: str | None = None
    """The level this one is solved under (None for the top level)."""
    kinds: dict[str, str] = field(default_factory=dict)
    """Variable name -> its declared kind (tensor, module, hyperparameter, architecture, supernet)."""
    init_from: tuple[tuple[int, int], ...] = ()
    """(index in this level's flat tuple, index in the parent's) pairs: every solve starts these
    variables at the parent's values (``init_from`` in the spec; MAML)."""
    prox: ProximalTerm | None = None
    """A proximal term tying this level's variables to the parent's (``prox`` in the spec; iMAML)."""
    stacked: bool = False
    """The variables carry a leading dimension of independent instances (``bilevel.problem.stack``):
    projections onto a simplex then act per instance."""
    share: float = 1.0
    """This rank's weight in the level's union objective under data parallelism: its fraction of
    the level's examples, or 1/W when every rank holds the whole data; 1 in a single process
    (bilevel.distributed.reduce)."""

    def shared(self, value: Tensor) -> Tensor:
        """``value`` weighted by this rank's share (unchanged in a single process)."""
        return value if self.share == 1.0 else value * self.share
    transforms: dict[str, VariableTransform] = field(default_factory=dict)
    """Tensor variable -> its map from the raw tensor to the value user code sees (hyperparameter
    variables); the others are the identity."""
    proxes: tuple[Prox | None, ...] = ()
    """Per flat tensor: the proximal operator of the non-smooth term declared on it (``prox``),
    or None; empty when the level declares none (``bilevel.prox``)."""

    @property
    def nonsmooth(self) -> bool:
        """Some variable declares a set or a prox: the lower solution is then a fixed point of the
        projected / proximal gradient step, y = T(y) = P(y - eta grad_y G), not a zero of grad_y G."""
        return any(s is not None for s in self.sets) or any(p is not None for p in self.proxes)

    def prox_step(self, params: Params, step: float | Tensor | tuple[Tensor, ...], upper: VariableView) -> Params:
        """P(params): each declared prox_{step g} (strengths read from ``upper``; ``step`` one per
        tensor for per-entry learning rates), then the projection onto each declared set;
        ``project`` when no prox is declared."""
        if not any(p is not None for p in self.proxes):
            return self.project(params)
        steps = step if isinstance(step, tuple) else (step,) * len(params)
        return tuple(project_onto(value if prox is None else prox(upper, value, s), where)
                     for value, prox, s, where in zip(params, self.proxes, steps, self.sets or (None,) * len(params)))

    def transform(self, name: str) -> VariableTransform:
        """The raw -> value map of tensor variable ``name`` (identity for a plain tensor)."""
        return self.transforms.get(name, IDENTITY)

    def items(self, params: Sequence[Tensor], drawn: Mapping[str, Drawn] | None = None) -> dict[str, Any]:
        """Name -> what user code sees, for this level's variables at ``params``; ``drawn``
        replaces some tensor variables' values (an engine's perturbation, in user units)."""
        out: dict[str, Any] = {}
        for name, i in self.tensors.items():
            if drawn is not None and name in drawn:
                out[name] = drawn[name].value
            else:
                out[name] = self.transforms[name].value(params[i]) if name in self.transforms else params[i]
        for name, binding in self.modules.items():
            values = params[binding.start : binding.start + len(binding.param_names)]
            out[name] = _FunctionalModule(binding.module, dict(zip(binding.param_names, values)))
        return out

    def codes(self, params: Sequence[Tensor], drawn: Mapping[str, Drawn] | None = None) -> dict[str, Tensor]:
        """Tensor variable -> the flat encoding of its value (``drawn`` ones: their drawn code)."""
        return {
            name: drawn[name].code if drawn is not None and name in drawn else self.transform(name).code(params[i])
            for name, i in self.tensors.items()
        }

    def view(self, params: Sequence[Tensor], drawn: Mapping[str, Drawn] | None = None) -> VariableView:
        return VariableView(self.items(params, drawn), lambda: self.codes(params, drawn))

    def values(self, params: Sequence[Tensor]) -> dict[str, Any]:
        """Name -> value in user units (hyperparameters transformed; module variables as their
        parameter dicts), for outputs such as result.json."""
        out: dict[str, Any] = self.variables(params)
        for name, transform in self.transforms.items():
            out[name] = transform.value(params[self.tensors[name]])
        return out

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.init)

    def batch(self) -> Any:
        return None if self.data is None else self.data.next()

    def from_items(self, values: Mapping[str, Tensor], like: Params) -> Params:
        """The flat tuple holding ``values`` (tensor variables by name), cast like ``like``."""
        flat = list(like)
        for name, index in self.tensors.items():
            flat[index] = values[name].to(dtype=like[index].dtype, device=like[index].device)
        return tuple(flat)

    def project(self, params: Params) -> Params:
        """Projection onto the declared simple sets (identity where none is declared); on a
        stacked level a simplex is taken over the entries of one instance, not of the batch."""
        if not any(s is not None for s in self.sets):
            return params
        if not self.stacked:
            return tuple(project_onto(p, s) for p, s in zip(params, self.sets))
        return tuple(torch.func.vmap(functools.partial(project_onto, where=s))(p) if isinstance(s, SimplexSet)
                     else project_onto(p, s) for p, s in zip(params, self.sets))

    def variables(self, params: Sequence[Tensor]) -> dict[str, Tensor | dict[str, Tensor]]:
        """Name -> tensor (or module parameter dict) for outputs and checkpoints."""
        out: dict[str, Tensor | dict[str, Tensor]] = {name: params[i] for name, i in self.tensors.items()}
        for name, binding in self.modules.items():
            values = params[binding.start : binding.start + len(binding.param_names)]
            out[name] = dict(zip(binding.param_names, values))
        return out


def project_onto(value: Tensor, where: BoxSet | SimplexSet | None) -> Tensor:
    """Euclidean projection of a variable onto its declared simple set (identity for None)."""
    if where is None:
        return value
    if isinstance(where, SimplexSet):
        return project_simplex(value, where.radius)
    return value.clamp(where.low, where.high)


def _no_objective(upper: Any, lower: Any, batch: Any) -> Tensor:
    raise TypeError("a merged view of several levels has no objective of its own; evaluate each level"
                    " with Problem.objective(k, params, batch)")


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
                 tensors=tensors, modules=modules, sets=tuple(sets), stacked=any(level.stacked for level in levels))
