"""The dry run of a compiled problem: every level's objective at the initial variables, with the
views it will get, returns a finite floating-point scalar; constraints return floating-point tensors of
their declared shapes and hold at the start; a closed-form solution returns every tensor
variable of its level at the declared shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.compile.issues import IssueLog
from bilevel.problem import Level, Problem
from bilevel.spec.errors import VariableError
from bilevel.spec.level import LevelSpec

__all__ = ["dry_run"]


def _first_batch(level: Level) -> Any:
    """What the level's objective receives at its first step (a minibatch's worth of the data)."""
    if level.data is None:
        return None
    if level.data.batch_size is None:
        return level.data.full
    return {key: value[: level.data.batch_size] for key, value in level.data.full.items()}


def dry_run(log: IssueLog, problem: Problem, specs: Mapping[str, LevelSpec]) -> None:
    """Evaluate every objective, constraint and closed form at the initial variables, logging
    what fails (at the dotted path of the objective, or of the variable user code names)."""
    params = [level.init for level in problem.chain]
    shapes = ", ".join(f"levels.{name}.variables" for name in problem.level_names)
    hint = "" if problem.depth == 2 else "; see docs/howto/multilevel.md for what upper and lower hold"
    for k, level in enumerate(problem.chain):
        path = f"levels.{level.name}.objective"
        try:
            value = problem.objective(k, params, _first_batch(level))
        except VariableError as exc:  # user code that names the variable at fault
            log.fail_variable(problem.levels, exc)
            continue
        except Exception as exc:  # user code
            log.fail(path, f"evaluating at the initial variables raised {type(exc).__name__}: {exc}"
                           f" (check the shapes under {shapes} and the data{hint})")
            continue
        if not isinstance(value, Tensor) or value.numel() != 1:
            got = type(value).__name__ if not isinstance(value, Tensor) else f"a Tensor of shape {list(value.shape)}"
            log.fail(path, f"the objective returned {got}, expected a scalar Tensor")
        elif not value.is_floating_point():
            log.fail(path, f"the objective returned a {value.dtype} tensor, expected a floating-point scalar")
        elif not bool(torch.isfinite(value.detach()).all()):
            bad = [f"{name} ({int((~torch.isfinite(p)).sum())} entries)" for name, p in zip(level.param_names, level.init)
                   if p.is_floating_point() and not bool(torch.isfinite(p).all())]
            cause = (f"; the initial values of {', '.join(bad)} are not finite" if bad
                     else "; check the data and the initial values for NaN/inf, and the objective for log(0) or 0/0")
            log.fail(path, f"the objective is {float(value)} at the initial variables, expected a finite number{cause}")
    if problem.depth == 2:
        _check_constraints(log, problem, specs[problem.lower.name])
        _check_solution(log, problem)


def _check_solution(log: IssueLog, problem: Problem) -> None:
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
        log.fail_variable(problem.levels, exc)
        return
    except Exception as exc:  # user code
        log.fail(path, f"evaluating at the initial variables raised {type(exc).__name__}: {exc}")
        return
    if not isinstance(value, Mapping) or set(value) != set(lower.tensors):
        got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
        log.fail(path, f"the closed form returned {got}, expected a mapping with the variables {sorted(lower.tensors)}")
        return
    for name, index in lower.tensors.items():
        got, want = value[name], lower.init[index]
        if not isinstance(got, Tensor) or not got.is_floating_point() or got.shape != want.shape:
            shape = list(got.shape) if isinstance(got, Tensor) else type(got).__name__
            log.fail(path, f"the closed form's {name!r} is {shape}, expected a floating-point Tensor of shape {list(want.shape)}")


def _check_constraints(log: IssueLog, problem: Problem, spec: LevelSpec) -> None:
    """Each constraint returns a float tensor of its declared shape and holds at the start."""
    upper, lower = problem.upper, problem.lower
    batch = None if lower.data is None else lower.data.full
    for constraint, cspec in zip(lower.constraints, spec.constraints):
        path = f"{constraint.path}.fn"
        try:
            value = constraint.fn(upper.view(upper.init), lower.view(lower.init), batch)
        except Exception as exc:  # user code
            log.fail(path, f"evaluating at the initial variables raised {type(exc).__name__}: {exc}")
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            log.fail(path, f"the constraint returned {type(value).__name__}, expected a floating-point Tensor")
            continue
        if cspec.shape is not None and list(value.shape) != list(cspec.shape):
            log.fail(f"{constraint.path}.shape", f"the constraint returned shape {list(value.shape)}, declared {cspec.shape}")
            continue
        violation = value.abs() if constraint.is_equality else value.clamp_min(0)
        worst = float(violation.max()) if violation.numel() else 0.0
        if not worst <= 1e-6 * max(1.0, float(value.abs().max())):
            log.fail(path, f"infeasible at the initial variables (largest violation {worst:.3g}); engines start"
                           " from a feasible point: change the variables' init so that the constraint holds")
