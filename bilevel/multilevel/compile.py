"""Compiling more than two levels: the levels must form a chain; each lower level needs an inner
solver; every objective is dry-run with the views it will get (bilevel/multilevel/chain.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import Tensor

from bilevel.distributed.reduce import current_world
from bilevel.multilevel.chain import ChainProblem
from bilevel.problem import Level
from bilevel.spec.errors import SpecError, SpecIssue
from bilevel.spec.load import LoadedSpec

if TYPE_CHECKING:
    from bilevel.compile import _Compiler

__all__ = ["build_chain", "chain_order"]


def chain_order(loaded: LoadedSpec, graph: nx.DiGraph) -> list[str]:
    """The level names from the top down; a SpecError where a level has two levels below it."""
    declared = list(loaded.spec.levels)
    order = [next(n for n in graph if graph.in_degree(n) == 0)]
    while True:
        children = sorted(graph.successors(order[-1]), key=declared.index)
        if not children:
            return order
        if len(children) > 1:
            raise loaded.error(
                f"levels.{children[1]}.parent",
                f"level {order[-1]!r} already has the lower level {children[0]!r}: more than two levels must form a chain"
                " (each level has at most one level below it); levels solved side by side under one parent are not"
                f" supported. Set the parent of {children[1]!r} to {children[0]!r} to nest it instead",
            )
        order.append(children[0])


def _setup_issues(loaded: LoadedSpec, order: list[str], levels: dict[str, Level]) -> list[SpecIssue]:
    """Solvers, tuned hyperparameters and constraints, checked before anything is evaluated."""
    spec = loaded.spec
    issues: list[SpecIssue] = []
    if current_world().active:
        issues.append(loaded.issue("levels", f"{len(order)} levels: the nested engines for more than two levels run in"
                                   " one process; data-parallel runs (torchrun) take two-level problems"))
    for k, name in enumerate(order):
        level_spec = spec.levels[name]
        base = f"levels.{name}"
        if level_spec.constraints:
            issues.append(loaded.issue(f"{base}.constraints", "constraints are not supported on problems with more than two"
                                       " levels (no multilevel engine handles them)"))
        solver = level_spec.solver
        if k == 0:
            if solver is not None and solver.tuned:
                issues.append(loaded.issue(f"{base}.solver.tuned", "tuned hyperparameters belong to the inner solver of a"
                                           " lower level, not to the outer optimizer"))
            continue
        if solver is None:
            issues.append(loaded.issue(f"{base}.solver", "a lower level needs an inner solver (name, lr, steps)"))
            continue
        if solver.name == "normalized_momentum":
            issues.append(loaded.issue(f"{base}.solver.name", "normalized_momentum is an outer (top-level) optimizer;"
                                       " expected sgd, momentum or adam"))
        above = {v: (lvl, i) for lvl in order[:k] for v, i in levels[lvl].tensors.items()}
        for hyper, variable in solver.tuned.items():
            path = f"{base}.solver.tuned.{hyper}"
            if hyper == "momentum" and solver.name != "momentum":
                issues.append(loaded.issue(path, f"the {solver.name} solver has no momentum to tune; use name: momentum"))
            elif variable not in above:
                issues.append(loaded.issue(path, f"{variable!r} is not a tensor variable of a level above {name!r}"
                                                 f" (their tensor variables: {', '.join(above) or 'none'})"))
            elif levels[above[variable][0]].init[above[variable][1]].numel() != 1:
                shape = list(levels[above[variable][0]].init[above[variable][1]].shape)
                issues.append(loaded.issue(path, f"{variable!r} has shape {shape}; a tuned optimizer hyperparameter must be a scalar"))
    return issues


def _dry_run(compiler: "_Compiler", problem: ChainProblem) -> None:
    """Every level's objective at the initial variables, with the views it will get."""
    params = [level.init for level in problem.chain]
    shapes = ", ".join(f"levels.{name}.variables" for name in problem.level_names)
    for k, level in enumerate(problem.chain):
        batch: Any = None
        if level.data is not None:
            batch = level.data.full
            if level.data.batch_size is not None:
                batch = {key: value[: level.data.batch_size] for key, value in level.data.full.items()}
        path = f"levels.{level.name}.objective"
        try:
            value = problem.objective(k, params, batch)
        except Exception as exc:  # user code
            compiler.fail(path, f"evaluating at the initial variables raised {type(exc).__name__}: {exc} (check the shapes"
                                f" under {shapes} and the data; see docs/howto/multilevel.md for what upper and lower hold)")
            continue
        if not isinstance(value, Tensor) or value.numel() != 1:
            got = type(value).__name__ if not isinstance(value, Tensor) else f"a Tensor of shape {list(value.shape)}"
            compiler.fail(path, f"the objective returned {got}, expected a scalar Tensor")
        elif not value.is_floating_point():
            compiler.fail(path, f"the objective returned a {value.dtype} tensor, expected a floating-point scalar")


def build_chain(
    compiler: "_Compiler",
    order: list[str],
    levels: dict[str, Level],
    graph: nx.DiGraph,
    device: torch.device,
    report: Any,
    monitor: Any,
) -> ChainProblem:
    """The ChainProblem for compiled levels in chain ``order``; SpecError on any problem."""
    loaded = compiler.loaded
    issues = _setup_issues(loaded, order, levels)
    if issues:
        raise SpecError(issues)
    problem = ChainProblem(loaded.spec.name, levels, graph, device, compiler.dtype, report, monitor,
                           chain=tuple(levels[name] for name in order))
    _dry_run(compiler, problem)
    if compiler.issues:
        raise SpecError(compiler.issues)
    return problem
