"""A batch of independent instances of one problem, stacked into one problem.

N instances (differing by seed, data arguments, numeric objective arguments or initial values)
are compiled one by one (``bilevel.compile``), then stacked by :func:`stack`: every variable
gets a leading dimension of size N, and the objectives of the stacked problem are

    f_k(Z) = sum_i f_k^(i)(z^(i)),        for every level k,

each evaluated with ``torch.func.vmap`` over the single-instance objective the user wrote
(data shared by all instances is not copied: it enters vmap unbatched, so a linear layer becomes
one large matrix product; on CPU, instance-specific data are evaluated instance by instance,
see :func:`vectorization`). Because the instances do not interact, every derivative the engines
take is block diagonal, one block per instance:

    grad_Y G = (grad_{y_i} G_i)_i,   H = blockdiag(H_i),   J^T v = (J_i^T v_i)_i,
    d/dX F(X, Y_T(X)) = (dF_i/dx_i)_i   (through any elementwise inner optimizer).

So the engines run unchanged on the stacked problem with ordinary autograd (double backward
included), and each instance follows exactly the iterates it would follow alone, except where
an algorithm reduces over all variables: conjugate gradient's inner products and stopping test,
which the implicit engine takes per instance (``per_instance`` in ``bilevel.linalg.cg``).
This is why the batch is not a ``vmap`` of a second, functional copy of the engines: the one
implementation serves both, and the CUDA-graph fast path captures the batched call like any
other. Lower constraints are evaluated per instance alike (``constraint_values``), for engines that
keep instances apart (``qp``; those that project jointly lack ``handles_instances``). What couples
instances is refused: an outer optimizer normalizing by the norm of all variables, tuned inner learning rates/momenta
(one scalar step per instance would need per-instance broadcasting in the optimizer)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel.distributed.shard import own_rows
from bilevel.plain import plain
from bilevel.problem.level import Level, Params
from bilevel.problem.stacked_args import restrict_rows, unbound
from bilevel.problem.stacked_data import StackedDataStream
from bilevel.problem.problem import Problem
from bilevel.spec.errors import SpecError, SpecSource

__all__ = ["StackedDataStream", "StackedInstances", "stack", "vectorization"]


# --- the stacked evaluation -------------------------------------------------------------------
class _KwargsHolder:
    """The current instance's varying objective arguments, read by the template's objectives
    while vmap evaluates them (vmap passes them in as batched 0-d tensors)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Tensor]] = {}


def _unavailable(*args: Any, **kwargs: Any) -> Tensor:
    raise RuntimeError("a stacked level's objective is evaluated through Problem.objective")


@dataclasses.dataclass
class StackedInstances:
    """What makes a problem a batch of instances (see the module docstring): the single-instance
    problems (their data are views into the stacked data) and how their objectives are evaluated."""

    members: list[Problem]
    template: Problem
    """The single-instance problem whose objectives vmap evaluates."""
    levels: dict[str, Level]
    """The stacked levels (their data streams give each level's in_dims)."""
    varying_kwargs: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    """level -> objective argument -> its per-instance values, shape (N,)."""
    vary: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    holder: _KwargsHolder = dataclasses.field(default_factory=_KwargsHolder)
    vectorize: str = "vmap"
    """How the per-instance objectives are evaluated: "vmap" (batched kernels) or "loop" (one
    call per instance on views of the stacked tensors; see ``vectorization``)."""
    kind: str = "instances"
    """instances: every level stacked; tasks, blocks: the top level shared by all
    (``bilevel.problem.tasks``, ``bilevel.problem.blocks``)."""
    count_: int = 0
    """The number of copies (instances: the members)."""
    top_reduce: str = "sum"
    """How the copies' top objectives make one: sum (instances), or a task batch's mean or sum."""
    tasks: Any = None
    """A task batch's samplers and meta-test settings (``bilevel.problem.tasks.TaskSetup``)."""
    blocks: Any = None
    """The block draws of a level of blocks (``bilevel.problem.blocks.BlockSampler``)."""

    @property
    def count(self) -> int:
        return self.count_ or len(self.members)

    def per_instance(self, k: int, params: Sequence[Sequence[Tensor]], batch: Any, drawn: Any = None) -> Tensor:
        """(f_k^(i)(z^(i)))_i, shape (N,); on a data-parallel rank, of the tasks of its slice of a task
        batch only (``own_rows``). (No engine that draws upper values takes a batch of instances.)"""
        if drawn is not None:
            raise TypeError("a batch of instances takes no drawn upper values (engines that draw them do not declare handles_instances)")
        template = self.template
        level = self.levels[template.chain[k].name]
        in_dims = None if batch is None or level.data is None else level.data.in_dims
        params_dims = tuple(0 if self.levels[lvl.name].stacked else None for lvl in template.chain)
        args, dims, count = (tuple(tuple(p) for p in params), batch, self.varying_kwargs), (params_dims, in_dims, 0), self.count
        rows = self.own_rows()
        if rows is not None:  # this rank's tasks: every stacked argument restricted to them
            args, count = restrict_rows(args, dims, slice(*rows)), rows[1] - rows[0]

        def one(pk: tuple[Params, ...], bk: Any, kw: dict[str, dict[str, Tensor]]) -> Tensor:
            self.holder.values = kw
            return template.objective(k, pk, bk).reshape(())

        if self.vectorize == "loop":
            return torch.stack([one(*part) for part in unbound(count, args, dims)])
        return torch.func.vmap(one, in_dims=dims, randomness="different")(*args)

    def own_rows(self) -> tuple[int, int] | None:
        """The copies this process evaluates: a data-parallel rank's contiguous slice of a task
        batch (``bilevel.problem.tasks``), None for all of them (one process, or not tasks)."""
        return own_rows(self.count) if self.kind == "tasks" else None

    def objective(self, k: int, params: Sequence[Sequence[Tensor]], batch: Any, drawn: Any = None) -> Tensor:
        """sum_i f_k^(i)(z^(i)) (each lower level with its inner solver's weight decay); the top
        level of a task batch: their mean or sum (``top_reduce``). On a rank that evaluates a
        slice of a task batch, the slice's part of that: its sum, or its sum / M for the mean."""
        values = self.per_instance(k, params, batch, drawn)
        if k != 0 or self.top_reduce != "mean":
            return values.sum()
        return values.mean() if self.own_rows() is None else values.sum() / self.count

    def constraint_values(self, x: Params, y: Params, batch: Any) -> tuple[Tensor, ...]:
        """Each lower constraint's values for every instance, (c^(i)(x_i, y_i))_i flattened
        instance-major (the template's constraints, evaluated like the objectives)."""
        template = self.template
        lower = self.levels[template.lower.name]
        in_dims = None if batch is None or lower.data is None else lower.data.in_dims
        x_dim = 0 if self.levels[template.upper.name].stacked else None

        def one(xi: Params, yi: Params, bi: Any, kw: dict[str, dict[str, Tensor]]) -> tuple[Tensor, ...]:
            self.holder.values = kw
            return tuple(v.reshape(-1) for v in template.constraint_values(xi, yi, bi))

        args, dims = (tuple(x), tuple(y), batch, self.varying_kwargs), (x_dim, 0, in_dims, 0)
        if self.vectorize == "loop":
            rows = [one(*part) for part in unbound(self.count, args, dims)]
            return tuple(torch.stack(column).reshape(-1) for column in zip(*rows))
        return tuple(v.reshape(-1) for v in torch.func.vmap(one, in_dims=dims, randomness="different")(*args))

    def results(self, x: Params, y: Params, losses: list[float], out_dir: Path | None) -> list[dict[str, Any]]:
        """Per instance: what varied, the final upper loss (``losses``: F_i on the full upper
        data, as the run's final evaluation computed them), the upper variables and the
        instance's report."""
        results = []
        for index, member in enumerate(self.members):
            xk = tuple(p[index].detach() for p in x)
            yk = tuple(p[index].detach() for p in y)
            entry: dict[str, Any] = {
                "index": index,
                "vary": {path: values[index] for path, values in self.vary.items()},
                "final_upper_loss": losses[index],
                "upper_variables": plain(member.upper.variables(xk)),
            }
            if member.report is not None:
                sub = None if out_dir is None else Path(out_dir) / f"instance_{index}"
                if sub is not None:
                    sub.mkdir(parents=True, exist_ok=True)
                entry["report"] = plain(member.report(member.upper.view(xk), member.lower.view(yk), out_dir=sub))
            results.append(entry)
        return results

    @property
    def monitored(self) -> bool:
        return bool(self.members) and self.members[0].monitor is not None

    def monitors(self, x: Params, y: Params, step: int, out_dir: Path) -> list[dict[str, Any]]:
        """Each instance's monitor values at the current variables (files it writes go to
        out_dir/instance_<k>)."""
        out = []
        for index, member in enumerate(self.members):
            if member.monitor is None:
                return []
            xk = tuple(p[index].detach() for p in x)
            yk = tuple(p[index].detach() for p in y)
            sub = Path(out_dir) / f"instance_{index}"
            sub.mkdir(parents=True, exist_ok=True)
            with torch.no_grad():
                values = member.monitor(member.upper.view(xk), member.lower.view(yk), step=step, out_dir=sub)
            out.append(plain(dict(values or {})))
        return out


def vectorization(device: torch.device, levels: Mapping[str, Any]) -> str:
    """vmap, except on CPU when some data differ between instances: there a batched matrix
    product of per-instance operands (what vmap makes of a linear layer) ran at about half the
    speed of the same products done one by one (torch 2.13, MKL; docs/instances.md), while on a
    GPU one wide kernel replaces N launches. Shared data stay vmapped (one wide product)."""
    stacked = any(level.data is not None and any(dim == 0 for dim in level.data.in_dims.values()) for level in levels.values())
    return "loop" if device.type == "cpu" and stacked else "vmap"


# --- stacking -----------------------------------------------------------------------------------
def _refuse_coupling(source: SpecSource, problem: Problem) -> None:
    issues = []
    lower, upper = problem.lower, problem.upper
    tuned = sorted(k for k in lower.solver.tuned if k != "weight_decay")
    if tuned:
        issues.append(source.issue(f"levels.{lower.name}.solver.tuned", f"tuned {', '.join(tuned)} is not supported with"
                                   " instances (only weight_decay, which enters each instance's objective)"))
    if upper.solver is not None and upper.solver.name == "normalized_momentum":
        issues.append(source.issue(f"levels.{upper.name}.solver.name", "normalized_momentum normalizes by the norm of all"
                                   " upper variables, which would couple the instances; use sgd, momentum or adam"))
    if issues:
        raise SpecError(issues)


def _check_alike(source: SpecSource, members: list[Problem]) -> None:
    first = members[0]
    for index, member in enumerate(members[1:], start=1):
        for name, level in member.levels.items():
            ref = first.levels[name]
            for pname, a, b in zip(level.param_names, level.init, ref.init):
                if a.shape != b.shape:
                    raise source.error("instances.vary", f"instance {index}: {name}.{pname} has shape {list(a.shape)},"
                                       f" instance 0 {list(b.shape)}; instances must agree in shapes")
            if (level.data is None) != (ref.data is None):
                raise source.error("instances.vary", f"instance {index}: level {name!r} data differ in presence")
            if level.data is not None:
                for key, value in level.data.full.items():
                    other = ref.data.full.get(key)
                    if other is None or value.shape != other.shape or value.dtype != other.dtype:
                        raise source.error("instances.vary", f"instance {index}: data {name}.{key} has shape"
                                           f" {list(value.shape)}, instance 0 {None if other is None else list(other.shape)};"
                                           " instances must agree in shapes")


def _stack_level(name: str, members: list[Problem]) -> Level:
    levels = [m.levels[name] for m in members]
    first = levels[0]
    data = None
    if first.data is not None:
        data = StackedDataStream([lvl.data for lvl in levels])  # type: ignore[misc]
    init = tuple(torch.stack([lvl.init[i] for lvl in levels]) for i in range(len(first.init)))
    return dataclasses.replace(first, init=init, objective=_unavailable, data=data, solution=None,
                               stacked=True, share=1.0, transforms={})


def _template(members: list[Problem], varying: dict[str, dict[str, Tensor]], holder: _KwargsHolder) -> Problem:
    """Instance 0 with each objective reading its varying arguments from ``holder``."""
    first = members[0]
    if not varying:
        return first
    levels = dict(first.levels)
    for name, kwargs in varying.items():
        level = first.levels[name]
        bound = level.objective
        fn = bound.func if isinstance(bound, functools.partial) else bound
        common = {k: v for k, v in (bound.keywords if isinstance(bound, functools.partial) else {}).items() if k not in kwargs}

        def objective(upper: Any, lower: Any, batch: Any, _fn: Any = fn, _common: Any = common, _name: str = name) -> Tensor:
            return _fn(upper, lower, batch, **_common, **holder.values.get(_name, {}))

        levels[name] = dataclasses.replace(level, objective=objective)
    return dataclasses.replace(first, levels=levels)


def stack(members: list[Problem], vary: Mapping[str, list[Any]] | None = None) -> Problem:
    """The batch of the compiled single-instance ``members`` as one problem (see the module
    docstring). ``vary`` maps the dotted spec paths that differ between instances to their
    per-instance values (numeric objective arguments become per-instance tensors); a SpecError
    names what would couple the instances or what does not agree between them."""
    first = members[0]
    source = first.source
    _refuse_coupling(source, first)
    _check_alike(source, members)
    vary = dict(vary or {})
    varying: dict[str, dict[str, Tensor]] = {}
    for path, values in vary.items():
        parts = path.split(".")
        if parts[0] == "levels" and parts[2] == "objective_kwargs":
            varying.setdefault(parts[1], {})[parts[3]] = torch.tensor(values, dtype=first.dtype, device=first.device)
    holder = _KwargsHolder()
    levels = {name: _stack_level(name, members) for name in first.levels}
    stacked = StackedInstances(members=members, template=_template(members, varying, holder), levels=levels,
                               varying_kwargs=varying, vary=vary, holder=holder, vectorize=vectorization(first.device, levels))
    return Problem(first.name, levels, first.device, first.dtype, source=source, memory_budget_mb=first.memory_budget_mb,
                   engine=first.engine, fingerprint=first.fingerprint, stacked=stacked)
