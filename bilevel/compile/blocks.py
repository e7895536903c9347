"""Compiling a lower level of blocks (``levels.<lower>.blocks``): what such a spec must satisfy,
one spec per block (its seed and its values of ``blocks.vary``), and the stacked problem
(``bilevel.problem.blocks``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

from bilevel.compile.instances import check_path, set_path
from bilevel.problem import Problem
from bilevel.problem.blocks import BlockSampler, stack_blocks
from bilevel.spec.blocks import BlocksSpec
from bilevel.spec.errors import SpecError
from bilevel.spec.level import TensorVariable
from bilevel.spec.load import LoadedSpec, spec_from_data

__all__ = ["blocks_of", "compile_blocks"]


def blocks_of(loaded: LoadedSpec) -> tuple[str, BlocksSpec] | None:
    """The level that declares blocks and its ``blocks`` (None when no level does)."""
    declared = [(name, level.blocks) for name, level in loaded.spec.levels.items() if level.blocks is not None]
    return declared[0] if declared else None  # type: ignore[return-value]


def _issues(loaded: LoadedSpec, name: str, blocks: BlocksSpec) -> None:
    spec = loaded.spec
    base = f"levels.{name}.blocks"
    issues = []
    declared = [n for n, level in spec.levels.items() if level.blocks is not None]
    if len(declared) > 1:
        issues.append(loaded.source.issue(f"levels.{declared[1]}.blocks", f"only one level may declare blocks ({declared[0]!r}"
                                          " does)"))
    top = [n for n, level in spec.levels.items() if level.parent is None]
    if len(spec.levels) != 2 or spec.levels[name].parent is None:
        what = f"{name!r} is the top level" if spec.levels[name].parent is None else f"this spec has {len(spec.levels)} levels"
        issues.append(loaded.source.issue(base, "blocks are declared on the lower level of a bilevel problem (two levels:"
                                          f" the shared upper level and the level of blocks); {what}"))
    for other, path in (("instances", spec.instances), ("tasks", spec.tasks)):
        if path is not None:
            issues.append(loaded.source.issue(other, f"{other} and blocks cannot be combined: a level of blocks is already a"
                                              " batch of lower problems"))
    for path in blocks.vary:
        parts = path.split(".")
        if parts[0] == "levels" and parts[1] in top and parts[2] == "variables":
            issues.append(loaded.source.issue(f"{base}.vary.{path}", "the upper variables are shared by all blocks; only"
                                              " the lower level's variables, the data and objective arguments may vary"))
    for lname, level in spec.levels.items():
        for vname, var in level.variables.items():
            if isinstance(var, TensorVariable) and var.prox is not None:
                issues.append(loaded.source.issue(f"levels.{lname}.variables.{vname}.prox",
                                                  "proximal terms are not supported with a level of blocks"))
    if issues:
        raise SpecError(issues)
    for path in blocks.vary:
        check_path(loaded, path, f"{base}.vary")


def block_specs(loaded: LoadedSpec, name: str, blocks: BlocksSpec) -> list[LoadedSpec]:
    """One spec per block, without ``blocks``: block i gets run.seed + i and the i-th value of
    each ``vary`` entry."""
    base = loaded.spec.model_dump(mode="json")
    base["levels"][name].pop("blocks")
    out = []
    for index in range(blocks.count):
        data = copy.deepcopy(base)
        data["run"]["seed"] = loaded.spec.run.seed + index
        for path in blocks.vary:
            set_path(data, path, blocks.values(path)[index])
        out.append(spec_from_data(data, loaded.file, loaded.base_dir, loaded.lines))
    return out


def compile_blocks(loaded: LoadedSpec, compile_one: Callable[[LoadedSpec], Problem]) -> Problem:
    """The blocks problem of a spec whose lower level declares blocks: each block compiled by
    ``compile_one``, then stacked with a seeded sampler of the blocks drawn per step."""
    found = blocks_of(loaded)
    assert found is not None
    name, blocks = found
    _issues(loaded, name, blocks)
    members = [compile_one(one) for one in block_specs(loaded, name, blocks)]
    first = members[0]
    seed = loaded.spec.run.seed if blocks.seed is None else blocks.seed
    sampler = BlockSampler(blocks.count, blocks.drawn, blocks.order, seed, first.device)
    vary = {path: blocks.values(path) for path in blocks.vary}
    return stack_blocks(members, vary, sampler)
