"""The search space against a bilevel spec: named parameters resolved to spec fields, the default
space, validation of every candidate value, and the spec of one trial.

Named parameters: ``engine`` (the engine kind; a trial whose kind is the spec's keeps the spec's
engine settings, another kind gets that engine's defaults), ``outer_lr`` (the top level's solver
lr), ``inner_lr`` and ``inner_steps`` (the lower level's solver lr and steps). Any other parameter
names the spec field it sets with ``path``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from bilevel.spec.errors import SpecError, SpecIssue
from bilevel.spec.level import OptimizerSpec
from bilevel.spec.load import LoadedSpec, spec_from_data
from bilevel.spec.problem import BilevelSpec, level_graph
from bilevel.sweeps.spec import CategoricalParam, FloatParam, IntParam, SweepSpec

__all__ = ["NAMED_PARAMETERS", "RESULT_OBJECTIVES", "Dimension", "default_space", "resolve_space", "trial_data"]

NAMED_PARAMETERS = ("engine", "outer_lr", "inner_lr", "inner_steps")
RESULT_OBJECTIVES = ("final_upper_loss", "wall_time_s")

Param = FloatParam | IntParam | CategoricalParam


@dataclass(frozen=True)
class Dimension:
    """One searched parameter and the spec field it sets."""

    name: str
    param: Param
    path: tuple[str, ...]


def _levels(spec: BilevelSpec) -> tuple[str, str | None]:
    """(top level, its only child or None)."""
    graph = level_graph(spec.levels)
    top = next(n for n in graph if graph.in_degree(n) == 0)
    children = list(graph.successors(top))
    return top, children[0] if len(children) == 1 else None


def _named_path(name: str, spec: BilevelSpec) -> tuple[str, ...] | None:
    top, lower = _levels(spec)
    if name == "engine":
        return ("engine",)
    if name == "outer_lr":
        return ("levels", top, "solver", "lr")
    if name in ("inner_lr", "inner_steps") and lower is not None:
        return ("levels", lower, "solver", "lr" if name == "inner_lr" else "steps")
    return None


def compatible_engines(spec: BilevelSpec) -> list[str]:
    """Hypergradient engines whose declared assumptions fit the spec's lower level (derivative-free
    estimates, which cost a lower solve per perturbation, only where a sweep file names them)."""
    from bilevel.engines import engine_capabilities

    _, lower = _levels(spec)
    if lower is None:
        return []
    level = spec.levels[lower]
    tuned = level.solver is not None and bool({"lr", "momentum"} & set(level.solver.tuned))
    return sorted(
        kind for kind, cap in engine_capabilities().items()
        if cap.returns_hypergradient
        and not cap.derivative_free
        and level.assumptions.convexity in cap.lower_convexity
        and (cap.handles_constraints or not level.constraints)
        and (cap.through_optimizer or not tuned)
        and (not cap.needs_quadratic or level.assumptions.quadratic)
    )


def default_space(spec: BilevelSpec) -> dict[str, Param]:
    """outer_lr log-uniform in [lr / 10, 10 lr]; inner_steps log-uniform in [steps / 4, 2 steps];
    engine over the compatible hypergradient engines when there are several."""
    top, lower = _levels(spec)
    space: dict[str, Param] = {}
    lr = (spec.levels[top].solver or OptimizerSpec()).lr
    space["outer_lr"] = FloatParam(low=lr / 10, high=lr * 10, log=True)
    solver = spec.levels[lower].solver if lower is not None else None
    if solver is not None and solver.steps >= 1:
        space["inner_steps"] = IntParam(low=max(1, solver.steps // 4), high=max(2, 2 * solver.steps), log=True)
    engines = compatible_engines(spec)
    if len(engines) > 1:
        space["engine"] = CategoricalParam(choices=engines)
    return space


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        if node.get(key) is None:  # an optional section left out (e.g. a solver): start it
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise KeyError(".".join(path))
    node[path[-1]] = value


def trial_data(base: dict[str, Any], dimensions: list[Dimension], values: dict[str, Any]) -> dict[str, Any]:
    """The base spec's data with each dimension's value set."""
    data = copy.deepcopy(base)
    for dim in dimensions:
        value = values[dim.name]
        if dim.path == ("engine",):
            same = isinstance(data.get("engine"), dict) and data["engine"].get("kind") == value
            data["engine"] = data["engine"] if same else {"kind": value}
        else:
            _set(data, dim.path, value)
    return data


def resolve_space(sweep: SweepSpec, base: LoadedSpec, file: str, lines: dict[tuple[str, ...], int], prefix: tuple[str, ...]) -> list[Dimension]:
    """The sweep's dimensions against the base spec; SpecError (naming the sweep file and the
    dotted path of the parameter) for unknown names, engine kinds, fields, and for values the spec
    rejects."""
    from bilevel.engines import engine_kinds

    issues: list[SpecIssue] = []

    def issue(path: tuple[str, ...], message: str) -> None:
        key = (*prefix, *path)
        issues.append(SpecIssue(file, ".".join(key), message, lines.get(key) or lines.get(prefix)))

    objective = sweep.objective
    if objective not in RESULT_OBJECTIVES and not (objective.startswith("report.") and len(objective) > len("report.")):
        issue(("objective",), f"unknown objective {objective!r}; expected one of {', '.join(RESULT_OBJECTIVES)} or report.<key>")

    space = sweep.space or default_space(base.spec)
    base_data = base.spec.model_dump(mode="json")
    dimensions: list[Dimension] = []
    for name, param in space.items():
        where = ("space", name)
        if param.path is not None:
            path = tuple(param.path.split("."))
        else:
            named = _named_path(name, base.spec)
            if named is None:
                known = ", ".join(NAMED_PARAMETERS)
                issue(where, f"unknown parameter {name!r}: named parameters are {known} (inner_* need a single lower"
                             " level); give any other one a path, e.g. path: levels.lower.objective_kwargs.mu")
                continue
            path = named
        if path == ("engine",):
            if not isinstance(param, CategoricalParam):
                issue(where, "engine is categorical: give choices: [implicit, unrolled, ...]")
                continue
            unknown = [c for c in param.choices if c not in engine_kinds()]
            if unknown:
                issue((*where, "choices"), f"unknown engine kind(s) {unknown}; expected some of: {', '.join(engine_kinds())}")
                continue
        dim = Dimension(name, param, path)
        candidates = param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]
        for value in candidates:
            try:
                spec_from_data(trial_data(base_data, [dim], {name: value}), base.file, base.base_dir)
            except KeyError:
                issue((*where, "path"), f"{'.'.join(path)} does not lead to a field of the spec")
                break
            except SpecError as exc:
                problem = "; ".join(f"{i.path}: {i.message}" for i in exc.issues)
                issue(where, f"the value {value!r} for {'.'.join(path)} makes the spec invalid: {problem}")
                break
        dimensions.append(dim)
    if issues:
        raise SpecError(issues)
    if not dimensions:
        raise SpecError([SpecIssue(file, ".".join((*prefix, "space")), "the search space is empty", lines.get(prefix))])
    return dimensions
