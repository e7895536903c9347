"""The compiled problem: levels as flat tuples of tensors, their views for user code, the chain
of levels from the top down, and batches of instances stacked into one problem.

* :mod:`~bilevel.problem.level`: one level (variables, objective, data, solver, sets, constraints);
* :mod:`~bilevel.problem.problem`: the :class:`Problem` engines see, at any depth;
* :mod:`~bilevel.problem.stack`: ``stack(problems) -> Problem`` for independent instances."""

from __future__ import annotations

from bilevel.problem.level import Constraint, Level, ModuleBinding, Params, Prox, ProximalTerm, VariableView, merge_levels, project_onto
from bilevel.problem.problem import Problem
from bilevel.problem.stack import StackedDataStream, StackedInstances, stack

__all__ = [
    "Constraint",
    "Level",
    "ModuleBinding",
    "Params",
    "Problem",
    "Prox",
    "ProximalTerm",
    "StackedDataStream",
    "StackedInstances",
    "VariableView",
    "merge_levels",
    "project_onto",
    "stack",
]
