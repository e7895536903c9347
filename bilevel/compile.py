"""Compile a validated spec into a Problem: resolve user code, load data, build variables on the
device, and check by a dry run that every objective can be called and returns a scalar."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError
from torch import Tensor

from bilevel.data import DataStream
from bilevel.distributed.reduce import current_world
from bilevel.distributed.shard import replicated_share, shard_rows
from bilevel.hyperparameters import make_transform
from bilevel.problem import Constraint, Level, ModuleBinding, Problem, project_onto
from bilevel.refs import RefError, resolve_ref
from bilevel.spec.errors import SpecError, SpecIssue, VariableError
from bilevel.spec.hyperparameter import HyperparameterVariable
from bilevel.spec.level import LevelSpec, ModuleVariable, OptimizerSpec, TensorVariable
from bilevel.spec.load import LoadedSpec, describe_error
from bilevel.spec.problem import BilevelSpec, level_graph

__all__ = ["compile_spec", "resolve_device"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Compiler:
    def __init__(self, loaded: LoadedSpec, device: torch.device, dtype: torch.dtype):
        self.loaded = loaded
        self.device = device
        self.dtype = dtype
        self.issues: list[SpecIssue] = []

    def fail(self, path: str, message: str) -> None:
        self.issues.append(self.loaded.issue(path, message))

    def fail_call(self, exc: Exception, ref: str, path: str, kwargs_path: str, argument: str | None = None) -> None:
        """Report an exception raised by user code called with keyword arguments from the spec.
        A pydantic ValidationError (user code validating its arguments, e.g. with
        ``pydantic.validate_call``, or an argument checked against its annotation) is reported at
        the dotted path of each offending argument; ``argument`` names the one argument whose value
        was validated (then the paths lie inside it)."""
        if isinstance(exc, ValidationError):
            for error in exc.errors(include_url=False):
                where = ".".join([kwargs_path, *(str(part) for part in error["loc"])])
                unknown = error["type"] in ("extra_forbidden", "unexpected_keyword_argument")
                if argument is None:
                    self.fail(where, f"unknown argument of {ref} (check the spelling)" if unknown else describe_error(error))
                else:
                    self.fail(where, f"unknown field of the {argument} argument of {ref} (check the spelling)" if unknown
                              else f"{describe_error(error)} (the {argument} argument of {ref})")
            return
        self.fail(path, f"calling {ref} raised {type(exc).__name__}: {exc}")

    def ref(self, ref: str, path: str, want_callable: bool = True) -> Any:
        try:
            obj = resolve_ref(ref, self.loaded.base_dir)
        except RefError as exc:
            self.fail(path, str(exc))
            return None
        if want_callable and not callable(obj):
            self.fail(path, f"{ref!r} is a {type(obj).__name__}, expected a callable")
            return None
        return obj

    def bind(self, fn: Callable[..., Any], n_args: int, kwargs: dict[str, Any], path: str, what: str) -> Any:
        """Check that fn accepts n_args positional arguments plus kwargs, and bind the kwargs."""
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return functools.partial(fn, **kwargs) if kwargs else fn
        try:
            signature.bind(*([None] * n_args), **kwargs)
        except TypeError as exc:
            extra = f", **{{{', '.join(kwargs)}}}" if kwargs else ""
            self.fail(path, f"{fn.__qualname__}{signature} does not match the expected signature {what}{extra}: {exc}")
            return None
        return functools.partial(fn, **kwargs) if kwargs else fn

    def check_annotated_kwargs(self, fn: Callable[..., Any], kwargs: Mapping[str, Any], ref: str, kwargs_path: str) -> None:
        """Validate keyword arguments from the spec against fn's type annotations, for functions that
        ``bilevel validate`` does not call (reports, monitors): ``models: int`` refuses "three", and a
        parameter annotated with a pydantic model validates a mapping field by field, each error at
        its dotted path under ``kwargs_path``. The function still receives the values as written;
        annotations pydantic cannot build a validator for are not checked."""
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotations: nothing to check against
            return
        for name, value in kwargs.items():
            if name not in hints:
                continue
            try:
                adapter = TypeAdapter(hints[name])
            except (PydanticSchemaGenerationError, TypeError, NameError):
                continue
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                self.fail_call(exc, ref, f"{kwargs_path}.{name}", f"{kwargs_path}.{name}", argument=name)

    # --- variables -------------------------------------------------------------------------
    def tensor(self, var: TensorVariable, path: str) -> Tensor | None:
        shape = tuple(var.shape)
        kw = {"device": self.device, "dtype": self.dtype}
        init = var.init
        if isinstance(init, (int, float)):
            return torch.full(shape, float(init), **kw)
        if init == "zeros":
            return torch.zeros(shape, **kw)
        if init == "ones":
            return torch.ones(shape, **kw)
        if init == "normal":
            return var.init_scale * torch.randn(shape, **kw)
        if init == "uniform":
            return var.init_scale * (2 * torch.rand(shape, **kw) - 1)
        fn = self.ref(init, f"{path}.init")
        if fn is None:
            return None
        try:
            value = torch.as_tensor(fn(**var.init_kwargs), **kw)
        except Exception as exc:  # user code
            self.fail_call(exc, init, f"{path}.init", f"{path}.init_kwargs")
            return None
        if tuple(value.shape) != shape:
            self.fail(f"{path}.init", f"{init} returned shape {list(value.shape)}, expected {list(shape)}")
            return None
        return value

    def module(self, level: str, vname: str, var: Any, path: str) -> torch.nn.Module | None:
        """The module of a module variable (built by its factory) or of an architecture or
        supernet variable (built from the declared search space)."""
        if not isinstance(var, ModuleVariable):
            from bilevel.nas.build import SearchSpaceError, build_variable_module

            try:
                return build_variable_module(self.loaded.spec, level, vname, self.loaded.base_dir)
            except SearchSpaceError as exc:
                self.fail(f"{path}{exc.field}", exc.message)
                return None
            except Exception as exc:  # a search space the network cannot be built from
                self.fail(path, f"building the {var.kind} variable raised {type(exc).__name__}: {exc}")
                return None
        factory = self.ref(var.factory, f"{path}.factory")
        if factory is None:
            return None
        try:
            module = factory(**var.kwargs)
        except Exception as exc:  # user code
            self.fail(f"{path}.factory", f"calling {var.factory} raised {type(exc).__name__}: {exc}")
            return None
        if not isinstance(module, torch.nn.Module):
            self.fail(f"{path}.factory", f"{var.factory} returned {type(module).__name__}, expected an nn.Module")
            return None
        return module

    def level(self, name: str, spec: LevelSpec, seed: int) -> Level | None:
        base = f"levels.{name}"
        n_before = len(self.issues)
        init: list[Tensor] = []
        names: list[str] = []
        tensors: dict[str, int] = {}
        modules: dict[str, ModuleBinding] = {}
        transforms = {}
        sets = []
        for vname, var in spec.variables.items():
            path = f"{base}.variables.{vname}"
            if isinstance(var, TensorVariable):
                value = self.tensor(var, path)
                if value is None:
                    continue
                value = project_onto(value, var.set)  # start inside the declared set
                tensors[vname] = len(init)
                names.append(vname)
                init.append(value)
                sets.append(var.set)
            elif isinstance(var, HyperparameterVariable):
                transforms[vname], value = make_transform(var, self.device, self.dtype)
                tensors[vname] = len(init)
                names.append(vname)
                init.append(value)
                sets.append(None)  # the range is kept by the transform
            else:
                module = self.module(name, vname, var, path)
                if module is None:
                    continue
                module = module.to(device=self.device, dtype=self.dtype)
                pnames = tuple(n for n, _ in module.named_parameters())
                modules[vname] = ModuleBinding(module, pnames, len(init))
                for pname, param in module.named_parameters():
                    names.append(f"{vname}.{pname}")
                    init.append(param.detach().clone())
                    sets.append(None)
        objective = self.ref(spec.objective, f"{base}.objective")
        if objective is not None:
            objective = self.bind(objective, 3, spec.objective_kwargs, f"{base}.objective", "f(upper, lower, batch)")
        data, share = None, replicated_share(current_world().size)
        if spec.data is not None:
            data, share = self.data(spec, f"{base}.data", seed) or (None, share)
        constraints = []
        for index, cspec in enumerate(spec.constraints):
            path = f"{base}.constraints.{index}"
            fn = self.ref(cspec.fn, f"{path}.fn")
            if fn is not None:
                fn = self.bind(fn, 3, cspec.kwargs, f"{path}.fn", "c(upper, lower, batch)")
            if fn is not None:
                constraints.append(Constraint(fn, cspec.kind, cspec.coupled, cspec.affine, path))
        solution = None
        if spec.solution is not None:
            if modules:
                self.fail(f"{base}.solution", f"a closed-form solution gives tensor variables; {', '.join(modules)}"
                          " is a module variable")
            if current_world().active and spec.data is not None and spec.data.shard:
                self.fail(f"{base}.solution", "a closed-form solution would see only this process's shard of the data"
                          " under data parallelism; set data.shard: false for this level or run in one process")
            solution = self.ref(spec.solution, f"{base}.solution")
            if solution is not None:
                solution = self.bind(solution, 3, spec.solution_kwargs, f"{base}.solution", "f(upper, lower, batch)")
        if len(self.issues) > n_before:
            return None
        solver = spec.solver
        if solver is None and solution is not None:
            solver = OptimizerSpec(steps=1)  # nothing steps through it: the closed form replaces the solve
        return Level(
            name=name,
            param_names=tuple(names),
            init=tuple(init),
            objective=objective,
            tensors=tensors,
            modules=modules,
            data=data,
            solver=solver,
            assumptions=spec.assumptions,
            sets=tuple(sets),
            constraints=tuple(constraints),
            share=share,
            solution=solution,
            transforms=transforms,
        )

    def data(self, spec: LevelSpec, path: str, seed: int) -> tuple[DataStream, float] | None:
        """The level's data stream and this rank's share of the level (its shard under data parallelism)."""
        assert spec.data is not None
        source = self.ref(spec.data.source, f"{path}.source")
        if source is None:
            return None
        try:
            raw = source(**spec.data.kwargs)
        except Exception as exc:  # user code
            self.fail_call(exc, spec.data.source, f"{path}.source", f"{path}.kwargs")
            return None
        if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
            self.fail(f"{path}.source", f"{spec.data.source} returned {type(raw).__name__}, expected a non-empty mapping name -> Tensor")
            return None
        sizes = {k: v.shape[0] if v.dim() else None for k, v in raw.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            self.fail(f"{path}.source", f"all tensors need the same first dimension (got {sizes})")
            return None
        world, share = current_world(), replicated_share(current_world().size)
        if world.active and spec.data.shard:  # shard before moving: a rank's device holds its shard only
            try:
                raw, share = shard_rows(raw, world.rank, world.size)
            except ValueError as exc:
                self.fail(f"{path}.shard", f"{exc}; use fewer processes, or shard: false to give every process the whole data")
                return None
            seed += 7919 * world.rank  # each shard is shuffled by its own generator
        moved = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in raw.items()
        }
        return DataStream(moved, spec.data.batch_size, seed), share

    # --- dry run ---------------------------------------------------------------------------
    def dry_run(self, problem: Problem) -> None:
        upper, lower = problem.upper, problem.lower
        for level in (upper, lower):
            batch = None if level.data is None else level.data.full
            if level.data is not None and level.data.batch_size is not None:
                batch = {k: v[: level.data.batch_size] for k, v in level.data.full.items()}
            path = f"levels.{level.name}.objective"
            try:
                value = level.objective(upper.view(upper.init), lower.view(lower.init), batch)
            except VariableError as exc:  # user code that names the variable at fault
                self.fail_variable(problem, exc)
                continue
            except Exception as exc:  # user code
                self.fail(path, f"evaluating at the initial variables raised {type(exc).__name__}: {exc}"
                          f" (check the shapes under levels.{upper.name}.variables, levels.{lower.name}.variables"
                          " and the data)")
                continue
            if not isinstance(value, Tensor) or value.numel() != 1:
                got = type(value).__name__ if not isinstance(value, Tensor) else f"a Tensor of shape {list(value.shape)}"
                self.fail(path, f"the objective returned {got}, expected a scalar Tensor")
            elif not value.is_floating_point():
                self.fail(path, f"the objective returned a {value.dtype} tensor, expected a floating-point scalar")
        self.check_constraints(problem)
        self.check_solution(problem)

    def fail_variable(self, problem: Problem, exc: VariableError) -> None:
        """A VariableError from user code, reported at the variable's dotted path."""
        for level in problem.levels.values():
            if exc.variable in level.tensors or exc.variable in level.modules:
                self.fail(f"levels.{level.name}.variables.{exc.variable}.{exc.field}", exc.message)
                return
        self.fail("levels", str(exc))

    def check_solution(self, problem: Problem) -> None:
        """A closed-form lower solution returns a float tensor of the declared shape for every
        tensor variable of the level."""
        upper, lower = problem.upper, problem.lower
        if lower.solution is None:
            return
        path = f"levels.{lower.name}.solution"
        batch = None if lower.data is None else lower.data.full
        try:
            with torch.no_grad():
                value = lower.solution(upper.view(upper.init), lower.view(lower.init), batch)
        except VariableError as exc:
            self.fail_variable(problem, exc)
            return
        except Exception as exc:  # user code
            self.fail(path, f"evaluating at the initial variables raised {type(exc).__name__}: {exc}")
            return
        if not isinstance(value, Mapping) or set(value) != set(lower.tensors):
            got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            self.fail(path, f"the closed form returned {got}, expected a mapping with the variables {sorted(lower.tensors)}")
            return
        for name, index in lower.tensors.items():
            got, want = value[name], lower.init[index]
            if not isinstance(got, Tensor) or not got.is_floating_point() or got.shape != want.shape:
                shape = list(got.shape) if isinstance(got, Tensor) else type(got).__name__
                self.fail(path, f"the closed form's {name!r} is {shape}, expected a floating-point Tensor of shape {list(want.shape)}")

    def check_constraints(self, problem: Problem) -> None:
        """Each constraint returns a float tensor of its declared shape and holds at the start."""
        upper, lower = problem.upper, problem.lower
        specs = self.loaded.spec.levels[lower.name].constraints
        batch = None if lower.data is None else lower.data.full
        for constraint, cspec in zip(lower.constraints, specs):
            path = f"{constraint.path}.fn"
            try:
                value = constraint.fn(upper.view(upper.init), lower.view(lower.init), batch)
            except Exception as exc:  # user code
                self.fail(path, f"evaluating at the initial variables raised {type(exc).__name__}: {exc}")
                continue
            if not isinstance(value, Tensor) or not value.is_floating_point():
                self.fail(path, f"the constraint returned {type(value).__name__}, expected a floating-point Tensor")
                continue
            if cspec.shape is not None and list(value.shape) != list(cspec.shape):
                self.fail(f"{constraint.path}.shape", f"the constraint returned shape {list(value.shape)}, declared {cspec.shape}")
                continue
            violation = value.abs() if constraint.is_equality else value.clamp_min(0)
            worst = float(violation.max()) if violation.numel() else 0.0
            if not worst <= 1e-6 * max(1.0, float(value.abs().max())):
                self.fail(path, f"infeasible at the initial variables (largest violation {worst:.3g}); engines start"
                          " from a feasible point: change the variables' init so that the constraint holds")


def _names_parameter(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _report_call(fn: Callable[..., Any], kwargs: dict[str, Any], wants_dir: bool) -> Callable[..., Any]:
    """The report called as report(upper, lower, out_dir=...): out_dir is passed on only to a
    function that names it among its parameters."""
    if wants_dir:
        return lambda upper, lower, out_dir=None: fn(upper, lower, out_dir=out_dir, **kwargs)
    return lambda upper, lower, out_dir=None: fn(upper, lower, **kwargs)


def _check_tuned(loaded: LoadedSpec, problem: Problem) -> None:
    """Tuned optimizer hyperparameters name scalar tensor variables of the upper level."""
    upper, lower = problem.upper, problem.lower
    if upper.solver is not None and upper.solver.tuned:
        raise loaded.error(f"levels.{upper.name}.solver.tuned",
                           "tuned hyperparameters belong to the inner solver of a lower level, not to the outer optimizer")
    issues = []
    for name, variable in lower.solver.tuned.items():
        path = f"levels.{lower.name}.solver.tuned.{name}"
        if name == "momentum" and lower.solver.name != "momentum":
            issues.append(loaded.issue(path, f"the {lower.solver.name} solver has no momentum to tune; use name: momentum"))
        elif variable in upper.transforms and upper.transforms[variable].discrete:
            issues.append(loaded.issue(path, f"{variable!r} is a discrete hyperparameter; an optimizer's {name} must be continuous"))
        elif variable not in upper.tensors:
            issues.append(loaded.issue(path, f"{variable!r} is not a tensor variable of the upper level {upper.name!r}"
                                             f" (its tensor variables: {', '.join(upper.tensors) or 'none'})"))
        elif upper.init[upper.tensors[variable]].numel() != 1:
            shape = list(upper.init[upper.tensors[variable]].shape)
            issues.append(loaded.issue(path, f"{variable!r} has shape {shape}; a tuned optimizer hyperparameter must be a scalar"))
    if issues:
        raise SpecError(issues)


def _check_hyperparameters_upstairs(loaded: LoadedSpec, problem: Problem) -> None:
    """Hyperparameter variables belong to the upper level: the lower level's variables are what
    its inner solver optimizes, and no inner solver respects a hyperparameter's type or range."""
    lower = problem.lower
    issues = [
        loaded.issue(f"levels.{lower.name}.variables.{name}",
                     f"hyperparameter variables belong to the upper level ({problem.upper.name!r}); declare {name!r} there,"
                     " or as a plain tensor variable (with a set for its range) here")
        for name in lower.transforms
    ]
    if issues:
        raise SpecError(issues)


def compile_spec(
    loaded: LoadedSpec | BilevelSpec,
    device: str | torch.device | None = None,
) -> Problem:
    """Build the Problem a spec describes, on ``device`` (default: the spec's run.device).

    Raises SpecError with one issue per problem found (missing callables, wrong signatures,
    data of the wrong form, shapes that make an objective fail at the initial point). Three or
    more levels forming a chain give a ``bilevel.multilevel.ChainProblem``."""
    if isinstance(loaded, BilevelSpec):
        loaded = LoadedSpec(loaded)
    spec = loaded.spec
    if spec.instances is not None:  # a batch of instances, compiled one by one and stacked
        from bilevel.instances import compile_instances

        return compile_instances(loaded, device)
    dev = resolve_device(str(device) if device is not None else spec.run.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise loaded.error("run.device", "cuda was requested but no CUDA device is available (use cpu or auto)")
    compiler = _Compiler(loaded, dev, _DTYPES[spec.run.dtype])
    graph = level_graph(spec.levels)
    chain = None
    if len(graph) > 2:  # more than two levels: a chain (bilevel/multilevel)
        from bilevel.multilevel.compile import chain_order

        chain = chain_order(loaded, graph)
    torch.manual_seed(spec.run.seed)
    levels: dict[str, Level] = {}
    for offset, (name, level_spec) in enumerate(spec.levels.items()):
        level = compiler.level(name, level_spec, spec.run.seed + 1000 * (offset + 1))
        if level is not None:
            levels[name] = level
    report = monitor = None
    if spec.report is not None:
        report = compiler.ref(spec.report, "report")
        if report is not None:
            wants_dir = _names_parameter(report, "out_dir")
            extra = {"out_dir": None} if wants_dir else {}
            checked = compiler.bind(report, 2, {**extra, **spec.report_kwargs}, "report", "f(upper, lower)")
            if checked is not None:
                compiler.check_annotated_kwargs(report, spec.report_kwargs, spec.report, "report_kwargs")
            report = None if checked is None else _report_call(report, spec.report_kwargs, wants_dir)
    if spec.monitor is not None:
        monitor = compiler.ref(spec.monitor, "monitor")
        if monitor is not None:
            checked = compiler.bind(monitor, 2, {"step": 0, "out_dir": None, **spec.monitor_kwargs}, "monitor",
                                    "f(upper, lower, *, step, out_dir)")
            if checked is None:
                monitor = None
            else:
                compiler.check_annotated_kwargs(monitor, spec.monitor_kwargs, spec.monitor, "monitor_kwargs")
                if spec.monitor_kwargs:
                    monitor = functools.partial(monitor, **spec.monitor_kwargs)
    if compiler.issues:
        raise SpecError(compiler.issues)
    if chain is not None:
        from bilevel.multilevel.compile import build_chain

        return build_chain(compiler, chain, levels, graph, dev, report, monitor)
    problem = Problem(spec.name, levels, graph, dev, compiler.dtype, report, monitor)
    lower_name = problem.lower.name
    if problem.lower.solver is None:
        raise loaded.error(f"levels.{lower_name}.solver", "a lower level needs an inner solver (name, lr, steps)")
    if problem.lower.solver.name == "normalized_momentum":
        raise loaded.error(f"levels.{lower_name}.solver.name",
                           "normalized_momentum is an outer (upper-level) optimizer; expected sgd, momentum or adam")
    _check_tuned(loaded, problem)
    _check_hyperparameters_upstairs(loaded, problem)
    compiler.dry_run(problem)
    if compiler.issues:
        raise SpecError(compiler.issues)
    return problem

