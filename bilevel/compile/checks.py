"""What a compiled problem must satisfy before anything is evaluated: its levels form a chain,
every lower level has an inner solver, tuned optimizer hyperparameters name scalar variables of
the levels above, hyperparameter variables sit at the top, and what more than two levels cannot
take (constraints, data parallelism) is refused."""

from __future__ import annotations

import networkx as nx

from bilevel.distributed.reduce import current_world
from bilevel.problem import Problem
from bilevel.spec.errors import SpecIssue, SpecSource
from bilevel.spec.problem import BilevelSpec, level_graph

__all__ = ["check_chain", "structure_issues"]


def check_chain(spec: BilevelSpec, source: SpecSource) -> None:
    """A SpecError where a level has two levels below it (levels solved side by side)."""
    graph: nx.DiGraph = level_graph(spec.levels)
    declared = list(spec.levels)
    parent = next(n for n in graph if graph.in_degree(n) == 0)
    while True:
        children = sorted(graph.successors(parent), key=declared.index)
        if not children:
            return
        if len(children) > 1:
            raise source.error(
                f"levels.{children[1]}.parent",
                f"level {parent!r} already has the lower level {children[0]!r}: more than two levels must form a chain"
                " (each level has at most one level below it); levels solved side by side under one parent are not"
                f" supported. Set the parent of {children[1]!r} to {children[0]!r} to nest it instead",
            )
        parent = children[0]


def structure_issues(problem: Problem) -> list[SpecIssue]:
    """Solvers, tuned hyperparameters, hyperparameter variables and constraints of every level."""
    source = problem.source
    chain = problem.chain
    issues: list[SpecIssue] = []
    if len(chain) > 2 and current_world().active:
        issues.append(source.issue("levels", f"{len(chain)} levels: the nested engines for more than two levels run in"
                                   " one process; data-parallel runs (torchrun) take two-level problems"))
    for k, level in enumerate(chain):
        base = f"levels.{level.name}"
        if len(chain) > 2 and level.constraints:
            issues.append(source.issue(f"{base}.constraints", "constraints are not supported on problems with more than two"
                                       " levels (no multilevel engine handles them)"))
        solver = level.solver
        if k == 0:
            if solver is not None and solver.tuned:
                issues.append(source.issue(f"{base}.solver.tuned", "tuned hyperparameters belong to the inner solver of a"
                                           " lower level, not to the outer optimizer"))
            continue
        issues += [
            source.issue(f"{base}.variables.{name}",
                         f"hyperparameter variables belong to the upper level ({chain[0].name!r}); declare {name!r} there,"
                         " or as a plain tensor variable (with a set for its range) here")
            for name in level.transforms
        ]
        if solver is None:
            issues.append(source.issue(f"{base}.solver", "a lower level needs an inner solver (name, lr, steps)"))
            continue
        if solver.name == "normalized_momentum":
            issues.append(source.issue(f"{base}.solver.name", "normalized_momentum is an outer (top-level) optimizer;"
                                       " expected sgd, momentum or adam"))
        above = {v: (lvl, i) for lvl in chain[:k] for v, i in lvl.tensors.items()}
        for hyper, variable in solver.tuned.items():
            path = f"{base}.solver.tuned.{hyper}"
            owner = above.get(variable)
            if hyper == "momentum" and solver.name != "momentum":
                issues.append(source.issue(path, f"the {solver.name} solver has no momentum to tune; use name: momentum"))
            elif owner is None:
                issues.append(source.issue(path, f"{variable!r} is not a tensor variable of a level above {level.name!r}"
                                                 f" (their tensor variables: {', '.join(above) or 'none'})"))
            elif variable in owner[0].transforms and owner[0].transforms[variable].discrete:
                issues.append(source.issue(path, f"{variable!r} is a discrete hyperparameter; an optimizer's {hyper} must be continuous"))
            elif solver.tuned_schedule is not None and hyper in solver.tuned_schedule.hyperparameters:
                if owner[0].init[owner[1]].dim() != 1:
                    shape = list(owner[0].init[owner[1]].shape)
                    issues.append(source.issue(path, f"{variable!r} has shape {shape}; a schedule (solver.tuned_schedule)"
                                                     " is a vector of shape [K], one entry per block of steps"))
            elif owner[0].init[owner[1]].numel() != 1:
                shape = list(owner[0].init[owner[1]].shape)
                issues.append(source.issue(path, f"{variable!r} has shape {shape}; a tuned optimizer hyperparameter must be a scalar"
                                                 " (or a vector read as a schedule: solver.tuned_schedule)"))
    return issues
