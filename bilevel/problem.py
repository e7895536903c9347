"""The compiled problem: what engines see.

Engines work on flat tuples of tensors, ``x`` for the upper level and ``y`` for the lower level.
A :class:`Level` knows how to present such a tuple to user code as a :class:`VariableView`
(tensors by name, modules as functional callables) and how to evaluate its objective."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.data import DataStream
from bilevel.hyperparameters import IDENTITY, Drawn, VariableTransform
from bilevel.linalg.project import project_simplex
from bilevel.spec.constraints import BoxSet, SimplexSet
from bilevel.spec.level import Assumptions, OptimizerSpec

__all__ = ["Constraint", "Level", "ModuleBinding", "Params", "Problem", "VariableView", "project_onto"]

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
        """Projection onto the declared simple sets (identity where none is declared)."""
        if not any(s is not None for s in self.sets):
            return params
        return tuple(project_onto(p, s) for p, s in zip(params, self.sets))

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


@dataclass
class Problem:
    """A compiled bilevel problem on a device and dtype.

    ``upper`` is the top level (variables x, objective F); ``lower`` its child (variables y,
    objective G). Both objectives are called as f(upper_view, lower_view, batch). In a
    data-parallel run ``upper_objective`` and ``lower_objective`` return this rank's share of the
    union objective (Level.share); engines never see the difference."""

    name: str
    levels: dict[str, Level]
    graph: nx.DiGraph
    device: torch.device
    dtype: torch.dtype
    report: Callable[..., Mapping[str, Any]] | None = None
    """report(upper_view, lower_view, out_dir=...) -> numbers for result.json."""
    monitor: Callable[..., Mapping[str, Any] | None] | None = None
    """monitor(upper_view, lower_view, step=..., out_dir=...) -> numbers for metrics.jsonl."""
    instances: int | None = None
    """None for one problem; N for a batch of N independent instances whose variables are stacked
    along a leading dimension (``bilevel.instances``): engines then keep the instances apart in
    every reduction (CG's inner products)."""

    # resolved once: objectives read them at every inner step (and torch.compile cannot trace networkx)
    @functools.cached_property
    def upper(self) -> Level:
        return self.levels[next(n for n in self.graph if self.graph.in_degree(n) == 0)]

    @functools.cached_property
    def lower(self) -> Level:
        (child,) = self.graph.successors(self.upper.name)
        return self.levels[child]

    def upper_objective(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any, drawn: Mapping[str, Drawn] | None = None) -> Tensor:
        """F(x, y) on an upper batch (``drawn``: upper values an engine substitutes, e.g. STN's
        perturbed hyperparameters); this rank's share of it under data parallelism."""
        return self.upper.shared(self.upper.objective(self.upper.view(x, drawn), self.lower.view(y), batch))

    def lower_objective(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any, drawn: Mapping[str, Drawn] | None = None) -> Tensor:
        """G(x, y) on a lower batch, plus the inner solver's weight decay wd/2 ||y||^2 when declared."""
        upper = self.upper.view(x, drawn)
        value = self.lower.objective(upper, self.lower.view(y), batch)
        solver = self.lower.solver
        if solver is None or (solver.weight_decay == 0.0 and "weight_decay" not in solver.tuned):
            return self.lower.shared(value)
        decay = upper[solver.tuned["weight_decay"]] if "weight_decay" in solver.tuned else solver.weight_decay
        return self.lower.shared(value + 0.5 * decay * sum((p * p).sum() for p in y))

    def tuned_hyperparameters(self, x: Sequence[Tensor], tuned: Mapping[str, str]) -> dict[str, Tensor]:
        """Optimizer hyperparameter -> the current value of the upper variable it is tuned by."""
        if not tuned:
            return {}
        upper = self.upper.view(x)
        return {name: upper[variable].reshape(()) for name, variable in tuned.items()}

    def constraint_values(self, x: Sequence[Tensor], y: Sequence[Tensor], batch: Any) -> tuple[Tensor, ...]:
        """Each lower constraint's values at (x, y), flattened (feasible where <= 0 / == 0)."""
        upper, lower = self.upper.view(x), self.lower.view(y)
        return tuple(c.fn(upper, lower, batch).reshape(-1) for c in self.lower.constraints)

    def fresh(self, params: Params, requires_grad: bool = False) -> Params:
        """Detached copies of ``params`` (leaves; requiring grad when asked)."""
        return tuple(p.detach().clone().requires_grad_(requires_grad) for p in params)
