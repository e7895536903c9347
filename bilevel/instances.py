"""A batch of independent instances of one problem, solved as one problem.

N instances (differing by seed, data arguments, numeric objective arguments or initial values)
are compiled one by one, then stacked: every variable gets a leading dimension of size N, and
the objectives of the stacked problem are

    F(X, Y) = sum_k F_k(x_k, y_k),    G(X, Y) = sum_k G_k(x_k, y_k),

each evaluated with ``torch.func.vmap`` over the single-instance objective the user wrote
(data shared by all instances is not copied: it enters vmap unbatched, so a linear layer becomes
one large matrix product; on CPU, instance-specific data are evaluated instance by instance,
see :func:`vectorization`). Because the instances do not interact, every derivative the engines
take is block diagonal, one block per instance:

    grad_Y G = (grad_{y_k} G_k)_k,   H = blockdiag(H_k),   J^T v = (J_k^T v_k)_k,
    d/dX F(X, Y_T(X)) = (dF_k/dx_k)_k   (through any elementwise inner optimizer).

So the engines run unchanged on the stacked problem with ordinary autograd (double backward
included), and each instance follows exactly the iterates it would follow alone, except where
an algorithm reduces over all variables: conjugate gradient's inner products and stopping test,
which the implicit engine takes per instance (``per_instance`` in ``bilevel.linalg.cg``).
This is why the batch is not a ``vmap`` of a second, functional copy of the engines: the one
implementation serves both, and the CUDA-graph fast path captures the batched call like any
other. What couples instances is refused: lower-level constraints (joint projections), an
outer optimizer normalizing by the norm of all variables, tuned inner learning rates/momenta
(one scalar step per instance would need per-instance broadcasting in the optimizer)."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel.data import DataStream, iter_chunks
from bilevel.problem import Level, Params, Problem, project_onto
from bilevel.spec.constraints import SimplexSet
from bilevel.spec.errors import SpecError
from bilevel.spec.load import LoadedSpec, spec_from_data

__all__ = ["BatchedProblem", "StackedDataStream", "compile_instances", "instance_specs"]


# --- the instances' specs ---------------------------------------------------------------------
def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if key.endswith("kwargs") else node[key]
    node[keys[-1]] = value


def _check_path(loaded: LoadedSpec, path: str) -> None:
    """The level, data source or variable a varying path names must exist in the spec."""
    spec, where = loaded.spec, f"instances.vary.{path}"
    parts = path.split(".")
    if parts[0] != "levels":
        return
    level = spec.levels.get(parts[1])
    if level is None:
        raise loaded.error(where, f"no level {parts[1]!r} (levels: {', '.join(spec.levels)})")
    if parts[2] == "data" and level.data is None:
        raise loaded.error(where, f"level {parts[1]!r} has no data source")
    if parts[2] == "variables":
        variable = level.variables.get(parts[3])
        if variable is None:
            raise loaded.error(where, f"level {parts[1]!r} has no variable {parts[3]!r}")
        if (parts[4] == "kwargs") != (variable.kind == "module"):
            raise loaded.error(where, f"{parts[3]!r} is a {variable.kind} variable, which has no field {parts[4]!r}")


def instance_specs(loaded: LoadedSpec) -> list[LoadedSpec]:
    """One spec per instance, without ``instances``: instance k gets run.seed + k and the k-th
    value of each ``vary`` entry."""
    spec = loaded.spec
    assert spec.instances is not None
    for path in spec.instances.vary:
        _check_path(loaded, path)
    base = spec.model_dump(mode="json")
    base.pop("instances")
    out = []
    for index in range(spec.instances.count):
        data = copy.deepcopy(base)
        data["run"]["seed"] = spec.run.seed + index
        for path, values in spec.instances.vary.items():
            _set_path(data, path, values[index])
        out.append(spec_from_data(data, loaded.file, loaded.base_dir, loaded.lines))
    return out


# --- data ---------------------------------------------------------------------------------------
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

    def example_numel(self) -> int:
        """Scalars of one example of all instances together (the planner's memory estimate)."""
        n = len(self.streams)
        return sum(t[0].numel() * n for t in self.streams[0].full.values())

    def state_dict(self) -> dict[str, object]:
        return {"members": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for stream, saved in zip(self.streams, state["members"]):
            stream.load_state_dict(saved)


# --- levels and the problem -------------------------------------------------------------------
@dataclasses.dataclass
class StackedLevel(Level):
    """A level whose variables carry a leading instance dimension."""

    def project(self, params: Params) -> Params:
        if not any(s is not None for s in self.sets):
            return params
        out = []
        for p, where in zip(params, self.sets):
            if isinstance(where, SimplexSet):  # over all entries of one instance, not of the batch
                out.append(torch.func.vmap(functools.partial(project_onto, where=where))(p))
            else:
                out.append(project_onto(p, where))
        return tuple(out)


def _unavailable(*args: Any, **kwargs: Any) -> Tensor:
    raise RuntimeError("a stacked level's objective is evaluated through BatchedProblem")


class _KwargsHolder:
    """The current instance's varying objective arguments, read by the template's objectives
    while vmap evaluates them (vmap passes them in as batched 0-d tensors)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Tensor]] = {}


def _no_draws(drawn: Any) -> None:
    if drawn is not None:
        raise TypeError("a batch of instances takes no drawn upper values (engines that draw them do not declare handles_instances)")


@dataclasses.dataclass
class BatchedProblem(Problem):
    """N independent instances stacked (see the module docstring). ``members`` are the
    single-instance problems (their data are views into the stacked data)."""

    members: list[Problem] = dataclasses.field(default_factory=list)
    template: Problem | None = None
    """The single-instance problem whose objectives vmap evaluates."""
    varying_kwargs: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    """level -> objective argument -> its per-instance values, shape (N,)."""
    vary: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    holder: _KwargsHolder = dataclasses.field(default_factory=_KwargsHolder)
    vectorize: str = "vmap"
    """How the per-instance objectives are evaluated: "vmap" (batched kernels) or "loop" (one
    call per instance on views of the stacked tensors; see ``vectorization``)."""

    def _per_instance(self, which: str, x: Params, y: Params, batch: Any) -> Tensor:
        template = self.template
        assert template is not None
        level = self.levels[template.upper.name if which == "upper" else template.lower.name]
        in_dims = None if batch is None or level.data is None else level.data.in_dims
        kwargs = {name: values for name, values in self.varying_kwargs.items()}
        objective = template.upper_objective if which == "upper" else template.lower_objective

        def one(xk: Params, yk: Params, bk: Any, kw: dict[str, dict[str, Tensor]]) -> Tensor:
            self.holder.values = kw
            return objective(xk, yk, bk).reshape(())

        if self.vectorize == "loop":
            return torch.stack([one(*parts) for parts in _unbound(self.instances or 0, (tuple(x), tuple(y), batch, kwargs),
                                                                 (0, 0, in_dims, 0))])
        return torch.func.vmap(one, in_dims=(0, 0, in_dims, 0), randomness="different")(tuple(x), tuple(y), batch, kwargs)

    def upper_objective(self, x: Params, y: Params, batch: Any, drawn: Any = None) -> Tensor:
        """sum_k F_k(x_k, y_k). (No engine that draws upper values takes a batch of instances.)"""
        _no_draws(drawn)
        return self._per_instance("upper", x, y, batch).sum()

    def lower_objective(self, x: Params, y: Params, batch: Any, drawn: Any = None) -> Tensor:
        """sum_k G_k(x_k, y_k) (each with its inner solver's weight decay)."""
        _no_draws(drawn)
        return self._per_instance("lower", x, y, batch).sum()

    def upper_objective_per_instance(self, x: Params, y: Params, batch: Any) -> Tensor:
        """(F_k(x_k, y_k))_k, shape (N,)."""
        return self._per_instance("upper", x, y, batch)

    def tuned_hyperparameters(self, x: Params, tuned: Mapping[str, str]) -> dict[str, Tensor]:
        # tuned lr / momentum are refused at compile time; a tuned weight decay enters each
        # instance's lower objective (inside vmap), not the optimizer
        return {}

    def instance(self, index: int) -> Problem:
        return self.members[index]

    def instance_results(self, x: Params, y: Params, losses: list[float], out_dir: Path | None) -> list[dict[str, Any]]:
        """Per instance: what varied, the final upper loss (``losses``: F_k on the full upper
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
                "upper_variables": {k: _nested(v) for k, v in member.upper.variables(xk).items()},
            }
            if member.report is not None:
                sub = None if out_dir is None else Path(out_dir) / f"instance_{index}"
                if sub is not None:
                    sub.mkdir(parents=True, exist_ok=True)
                entry["report"] = _plain(member.report(member.upper.view(xk), member.lower.view(yk), out_dir=sub))
            results.append(entry)
        return results

    def monitor_instances(self, x: Params, y: Params, step: int, out_dir: Path) -> list[dict[str, Any]]:
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
            out.append(_plain(dict(values or {})))
        return out


def _unbound(count: int, args: tuple[Any, ...], in_dims: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The per-instance arguments, as vmap would present them: ``torch.unbind`` along the
    leading dimension where in_dims says 0 (its backward is one stack, not N scatters)."""

    def split(value: Any, dim: Any) -> list[Any]:
        if value is None:
            return [None] * count
        if isinstance(dim, dict):
            parts = {key: split(value[key], dim.get(key)) for key in value}
            return [{key: parts[key][k] for key in value} for k in range(count)]
        if isinstance(value, dict):
            parts = {key: split(item, dim) for key, item in value.items()}
            return [{key: parts[key][k] for key in value} for k in range(count)]
        if isinstance(value, tuple):
            parts = [split(item, dim) for item in value]
            return [tuple(part[k] for part in parts) for k in range(count)]
        if dim is None:
            return [value] * count
        return list(torch.unbind(value, dim))

    columns = [split(arg, dim) for arg, dim in zip(args, in_dims)]
    return [tuple(column[k] for column in columns) for k in range(count)]


def vectorization(device: torch.device, levels: dict[str, Any]) -> str:
    """vmap, except on CPU when some data differ between instances: there a batched matrix
    product of per-instance operands (what vmap makes of a linear layer) ran at about half the
    speed of the same products done one by one (torch 2.13, MKL; docs/instances.md), while on a
    GPU one wide kernel replaces N launches. Shared data stay vmapped (one wide product)."""
    stacked = any(level.data is not None and any(dim == 0 for dim in level.data.in_dims.values()) for level in levels.values())
    return "loop" if device.type == "cpu" and stacked else "vmap"


def _nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nested(v) for k, v in value.items()}
    return value.detach().cpu().tolist()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    return value


# --- compilation --------------------------------------------------------------------------------
def _refuse_coupling(loaded: LoadedSpec, problem: Problem) -> None:
    issues = []
    lower, upper = problem.lower, problem.upper
    if lower.constraints:
        issues.append(loaded.issue(f"levels.{lower.name}.constraints", "lower-level constraints couple the variables of"
                                   " each instance through joint projections: not supported with instances"))
    tuned = sorted(k for k in lower.solver.tuned if k != "weight_decay")
    if tuned:
        issues.append(loaded.issue(f"levels.{lower.name}.solver.tuned", f"tuned {', '.join(tuned)} is not supported with"
                                   " instances (only weight_decay, which enters each instance's objective)"))
    if upper.solver is not None and upper.solver.name == "normalized_momentum":
        issues.append(loaded.issue(f"levels.{upper.name}.solver.name", "normalized_momentum normalizes by the norm of all"
                                   " upper variables, which would couple the instances; use sgd, momentum or adam"))
    if issues:
        raise SpecError(issues)


def _check_alike(loaded: LoadedSpec, members: list[Problem]) -> None:
    first = members[0]
    for index, member in enumerate(members[1:], start=1):
        for name, level in member.levels.items():
            ref = first.levels[name]
            for pname, a, b in zip(level.param_names, level.init, ref.init):
                if a.shape != b.shape:
                    raise loaded.error("instances.vary", f"instance {index}: {name}.{pname} has shape {list(a.shape)},"
                                       f" instance 0 {list(b.shape)}; instances must agree in shapes")
            if (level.data is None) != (ref.data is None):
                raise loaded.error("instances.vary", f"instance {index}: level {name!r} data differ in presence")
            if level.data is not None:
                for key, value in level.data.full.items():
                    other = ref.data.full.get(key)
                    if other is None or value.shape != other.shape or value.dtype != other.dtype:
                        raise loaded.error("instances.vary", f"instance {index}: data {name}.{key} has shape"
                                           f" {list(value.shape)}, instance 0 {None if other is None else list(other.shape)};"
                                           " instances must agree in shapes")


def _stack_level(name: str, members: list[Problem]) -> StackedLevel:
    levels = [m.levels[name] for m in members]
    first = levels[0]
    data = None
    if first.data is not None:
        data = StackedDataStream([lvl.data for lvl in levels])  # type: ignore[misc]
    init = tuple(torch.stack([lvl.init[i] for lvl in levels]) for i in range(len(first.init)))
    return StackedLevel(
        name=name,
        param_names=first.param_names,
        init=init,
        objective=_unavailable,
        tensors=dict(first.tensors),
        modules=dict(first.modules),
        data=data,  # type: ignore[arg-type]
        solver=first.solver,
        assumptions=first.assumptions,
        sets=first.sets,
        constraints=(),
    )


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
    template = dataclasses.replace(first, levels=levels)
    for cached in ("upper", "lower"):  # resolved anew for the new levels
        template.__dict__.pop(cached, None)
    return template


def compile_instances(loaded: LoadedSpec, device: str | torch.device | None = None) -> BatchedProblem:
    """Compile every instance and stack them into one :class:`BatchedProblem`."""
    from bilevel.compile import compile_spec

    spec = loaded.spec
    assert spec.instances is not None
    members = [compile_spec(one, device) for one in instance_specs(loaded)]
    _refuse_coupling(loaded, members[0])
    _check_alike(loaded, members)
    first = members[0]
    dtype = first.dtype
    varying: dict[str, dict[str, Tensor]] = {}
    for path, values in spec.instances.vary.items():
        parts = path.split(".")
        if parts[0] == "levels" and parts[2] == "objective_kwargs":
            varying.setdefault(parts[1], {})[parts[3]] = torch.tensor(values, dtype=dtype, device=first.device)
    holder = _KwargsHolder()
    levels = {name: _stack_level(name, members) for name in first.levels}
    return BatchedProblem(
        name=first.name,
        levels=levels,  # type: ignore[arg-type]
        graph=first.graph,
        device=first.device,
        dtype=dtype,
        report=None,
        monitor=None,
        instances=len(members),
        members=members,
        template=_template(members, varying, holder),
        varying_kwargs=varying,
        vary=dict(spec.instances.vary),
        holder=holder,
        vectorize=vectorization(first.device, levels),
    )
