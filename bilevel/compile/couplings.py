"""What ties a lower level to the level above it besides its objective: ``init_from`` (its solves
start at upper variables) and ``prox`` (a proximal term pulls it towards them), resolved from
variable names to pairs of positions in the levels' flat tuples, shapes checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from bilevel.compile.issues import IssueLog
from bilevel.problem import Level, ProximalTerm
from bilevel.spec.level import LevelSpec

__all__ = ["couple_levels"]


def _positions(level: Level, name: str) -> list[int]:
    """The flat positions of a variable (one for a tensor, one per parameter for a module)."""
    if name in level.tensors:
        return [level.tensors[name]]
    binding = level.modules[name]
    return list(range(binding.start, binding.start + len(binding.param_names)))


def _pairs(log: IssueLog, path: str, mapping: str | Mapping[str, str], level: Level, parent: Level) -> tuple[tuple[int, int], ...] | None:
    """(lower position, upper position) pairs of a mapping lower variable -> upper variable."""
    names = [*level.tensors, *level.modules]
    shorthand = isinstance(mapping, str)
    if isinstance(mapping, str):
        if len(names) != 1:
            log.fail(path, f"level {level.name!r} has {len(names)} variables ({', '.join(names)}): name the upper variable of"
                           " each one, {lower variable: upper variable}")
            return None
        mapping = {names[0]: mapping}
    pairs: list[tuple[int, int]] = []
    for lower_name, upper_name in mapping.items():
        where = path if shorthand else f"{path}.{lower_name}"
        if lower_name not in names:
            log.fail(where, f"level {level.name!r} has no variable {lower_name!r} (its variables: {', '.join(names)})")
            continue
        uppers = [*parent.tensors, *parent.modules]
        if upper_name not in uppers:
            log.fail(where, f"{upper_name!r} is not a variable of the level above, {parent.name!r} (its variables: {', '.join(uppers)})")
            continue
        if upper_name in parent.transforms:
            log.fail(where, f"{upper_name!r} is a hyperparameter variable; the variables a level starts from must be plain tensors or modules")
            continue
        low, up = _positions(level, lower_name), _positions(parent, upper_name)
        low_shapes = [list(level.init[i].shape) for i in low]
        up_shapes = [list(parent.init[j].shape) for j in up]
        if low_shapes != up_shapes:
            log.fail(where, f"{lower_name!r} has shape{'s' if len(low) > 1 else ''} {low_shapes if len(low) > 1 else low_shapes[0]}"
                            f" and {upper_name!r} {up_shapes if len(up) > 1 else up_shapes[0]}: they must have the same shape")
            continue
        pairs.extend(zip(low, up))
    return tuple(pairs)


def couple_levels(log: IssueLog, levels: dict[str, Level], specs: Mapping[str, LevelSpec]) -> dict[str, Level]:
    """The levels with their ``init_from`` and ``prox`` resolved (issues logged at their paths)."""
    out = dict(levels)
    for name, spec in specs.items():
        if (spec.init_from is None and spec.prox is None) or name not in levels:
            continue
        base = f"levels.{name}"
        if spec.parent is None or spec.parent not in levels:
            field = "init_from" if spec.init_from is not None else "prox"
            log.fail(f"{base}.{field}", "init_from and prox tie a lower level to the level above it; the top level has none")
            continue
        level, parent = levels[name], levels[spec.parent]
        changes: dict[str, object] = {}
        if spec.init_from is not None:
            pairs = _pairs(log, f"{base}.init_from", spec.init_from, level, parent)
            if pairs:
                changes["init_from"] = pairs
        if spec.prox is not None:
            pairs = _pairs(log, f"{base}.prox.anchor", spec.prox.anchor, level, parent)
            if pairs:
                changes["prox"] = ProximalTerm(spec.prox.lam, pairs)
        out[name] = dataclasses.replace(level, **changes)
    return out
