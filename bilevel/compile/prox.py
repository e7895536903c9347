"""Compiling the proximal terms of lower levels (``prox`` on a tensor variable): the operator
built, and what a problem with them must satisfy: a lower level of a two-level problem, solved by
proximal gradient steps (sgd), strengths naming upper tensor variables of a shape that
broadcasts, and a set only where the prox and the projection compose exactly."""

from __future__ import annotations

import torch

from bilevel.compile.issues import IssueLog
from bilevel.problem import Level, Problem
from bilevel.prox import Prox, make_prox, strength_names
from bilevel.spec.errors import SpecIssue, SpecSource
from bilevel.spec.level import TensorVariable
from bilevel.spec.load import LoadedSpec
from bilevel.spec.problem import BilevelSpec

__all__ = ["build_prox", "check_no_prox_with_instances", "prox_issues"]

_SEPARABLE = ("l1", "elastic_net")
"""Kinds whose prox is elementwise: on an interval, prox of g + the interval's indicator is the
projection of prox_g (true of any convex function of one variable), so a box composes exactly."""


def build_prox(log: IssueLog, var: TensorVariable, path: str) -> Prox | None:
    """The compiled proximal operator of a variable's ``prox`` (None without one, or with an issue)."""
    spec = var.prox
    if spec is None:
        return None
    if spec.kind != "custom":
        return make_prox(spec)
    fn = log.ref(spec.fn, f"{path}.prox.fn")
    if fn is None:
        return None
    fn = log.bind(fn, 3, spec.kwargs, f"{path}.prox.fn", "prox(upper, value, step)")
    return None if fn is None else make_prox(spec, fn)


def check_no_prox_with_instances(loaded: LoadedSpec) -> None:
    """A SpecError at the first prox of a spec with ``instances`` (not supported there)."""
    for level, level_spec in loaded.spec.levels.items():
        for name, var in level_spec.variables.items():
            if isinstance(var, TensorVariable) and var.prox is not None:
                raise loaded.error(f"levels.{level}.variables.{name}.prox",
                                   "proximal terms are not supported with a batch of instances (instances)")


def prox_issues(spec: BilevelSpec, problem: Problem) -> list[SpecIssue]:
    """Every way the declared proximal terms cannot be solved, at their dotted paths."""
    source, chain = problem.source, problem.chain
    issues: list[SpecIssue] = []
    top = chain[0]
    for k, level in enumerate(chain):
        variables = spec.levels[level.name].variables
        for name, var in variables.items():
            if not isinstance(var, TensorVariable) or var.prox is None:
                continue
            path = f"levels.{level.name}.variables.{name}.prox"
            if k == 0:
                issues.append(source.issue(path, "a prox declares a non-smooth term of a lower level's objective; the top"
                                           " level's optimizer takes no proximal steps"))
                continue
            if len(chain) > 2:
                issues.append(source.issue(path, f"proximal terms are supported on two-level problems; this one has"
                                           f" {len(chain)} levels"))
                continue
            if spec.tasks is not None:
                issues.append(source.issue(path, "proximal operators are not supported with tasks (meta-batches are"
                                           " solved stacked, as a batch of instances)"))
            solver = level.solver
            if solver is not None and solver.name != "sgd":
                issues.append(source.issue(f"levels.{level.name}.solver.name", f"a level with a prox ({path}) is solved by"
                                           f" proximal gradient steps y <- prox_(lr g)(y - lr grad G), which need name: sgd;"
                                           f" got {solver.name}"))
            if var.set is not None and (var.set.kind != "box" or var.prox.kind not in _SEPARABLE):
                issues.append(source.issue(path, f"a {var.prox.kind} prox on a variable with a {var.set.kind} set: the"
                                           " projection of the prox is the prox of their sum only for an elementwise prox"
                                           f" ({', '.join(_SEPARABLE)}) and a box; fold the set into a custom prox instead"))
            shape = tuple(var.shape)
            if var.prox.kind == "group_lasso":
                axis = var.prox.axis
                if not -len(shape) <= axis < max(len(shape), 1) or not shape:
                    issues.append(source.issue(f"{path}.axis", f"axis {axis} is not an axis of the variable's shape {list(shape)}"))
                    continue
                shape = tuple(1 if i == axis % len(shape) else n for i, n in enumerate(shape))
            for field, ref in strength_names(var.prox):
                issues += _strength_issue(source, f"{path}.{field}", ref, top, shape)
    return issues


def _strength_issue(source: SpecSource, path: str, ref: str, top: Level, shape: tuple[int, ...]) -> list[SpecIssue]:
    index = top.tensors.get(ref)
    if index is None:
        return [source.issue(path, f"{ref!r} is not a tensor variable of the upper level {top.name!r} (its tensor"
                                   f" variables: {', '.join(top.tensors) or 'none'})")]
    if top.transform(ref).discrete:
        return [source.issue(path, f"{ref!r} is a discrete hyperparameter; a prox strength must be continuous")]
    have = tuple(top.init[index].shape)
    try:
        broadcast = torch.broadcast_shapes(have, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        return [source.issue(path, f"{ref!r} has shape {list(have)}, which does not broadcast against {list(shape)}"
                                   " (the variable's shape, its grouped axis of size 1 for a group lasso)")]
    return []
