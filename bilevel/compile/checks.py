"""What a compiled problem must satisfy before anything is evaluated: every lower level has an
inner solver, tuned optimizer hyperparameters name scalar variables of its ancestors,
hyperparameter variables sit at the top, and what more than two levels (a chain or a tree)
cannot take (constraints, data parallelism, init_from, prox) is refused; so is a meta-batch
smaller than the number of data-parallel processes it is split over."""

from __future__ import annotations

from bilevel.distributed.reduce import current_world
from bilevel.problem import Problem
from bilevel.spec.errors import SpecIssue
from bilevel.spec.problem import BilevelSpec

__all__ = ["structure_issues", "task_issues"]


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
                                       " levels, chains or trees (no multilevel engine handles them)"))
        if len(chain) > 2 and (level.init_from or level.prox is not None):
            field = "init_from" if level.init_from else "prox"
            issues.append(source.issue(f"{base}.{field}", f"{field} is supported on the lower level of a bilevel problem,"
                                       " not on chains or trees of more than two levels"))
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
        ancestors = [chain[a] for a in problem.ancestors(k)]
        above = {v: (lvl, i) for lvl in ancestors for v, i in lvl.tensors.items()}
        modules_above = {v: (lvl, b) for lvl in ancestors for v, b in lvl.modules.items()}
        shapes = [list(p.shape) for p in level.init]
        for hyper, variable in solver.tuned.items():
            path = f"{base}.solver.tuned.{hyper}"
            owner = above.get(variable)
            if hyper == "momentum" and solver.name != "momentum":
                issues.append(source.issue(path, f"the {solver.name} solver has no momentum to tune; use name: momentum"))
            elif hyper == "lr" and variable in modules_above:  # one learning rate per entry (Meta-SGD)
                lvl, binding = modules_above[variable]
                rates = [list(lvl.init[binding.start + n].shape) for n in range(len(binding.param_names))]
                if rates != shapes:
                    issues.append(source.issue(path, f"{variable!r} is a module whose parameters have shapes {rates}; per-entry"
                                                     f" learning rates need the shapes of {level.name!r}'s variables, {shapes}"))
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
            elif owner[0].init[owner[1]].numel() != 1 and not (hyper == "lr" and [list(owner[0].init[owner[1]].shape)] == shapes):
                shape = list(owner[0].init[owner[1]].shape)
                per_entry = (f", one rate per entry (the shape of {level.name!r}'s only variable)" if hyper == "lr" else "")
                issues.append(source.issue(path, f"{variable!r} has shape {shape}; a tuned optimizer hyperparameter must be a"
                                                 f" scalar{per_entry}, or a vector read as a schedule (solver.tuned_schedule)"))
    return issues


def task_issues(problem: Problem, spec: BilevelSpec) -> list[SpecIssue]:
    """What a spec with ``tasks`` cannot also declare: the tasks give both levels their batches,
    the task level is solved anew for every task (no closed form, no instances); and under data
    parallelism every process needs a task of the meta-batch (meta_batch >= processes)."""
    if spec.tasks is None:
        return []
    source, chain = problem.source, problem.chain
    issues = []
    if spec.instances is not None:
        issues.append(source.issue("instances", "tasks and instances cannot be combined: a meta-batch of tasks is already a batch"))
    if len(chain) != 2:
        issues.append(source.issue("tasks", f"tasks need a bilevel problem (the task level below the top); this one has {len(chain)} levels"))
        return issues
    for level in chain:
        if spec.levels[level.name].data is not None:
            issues.append(source.issue(f"levels.{level.name}.data", "with tasks, the task sampler gives this level its batches"
                                       " (query sets upstairs, support sets downstairs); remove data"))
    if chain[1].solution is not None:
        issues.append(source.issue(f"levels.{chain[1].name}.solution", "a closed-form solution is not supported with tasks"))
    world = current_world()
    if world.active and spec.tasks.meta_batch < world.size:
        issues.append(source.issue("tasks.meta_batch", f"{spec.tasks.meta_batch} tasks per meta-batch cannot be split over"
                                   f" {world.size} processes (each process evaluates its own tasks); use a meta_batch of at"
                                   f" least {world.size}, or fewer processes"))
    return issues
