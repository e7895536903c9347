"""Build the modules of architecture and supernet variables from a validated spec (for compile):
cell spaces (``bilevel.nas.supernet``) and macro spaces (``bilevel.nas.macro``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from bilevel.nas.macro import MacroArchitecture, MacroSupernet
from bilevel.nas.supernet import Architecture, Supernet
from bilevel.spec.search_space import ArchitectureVariable, SupernetVariable

__all__ = ["SearchSpaceError", "build_variable_module", "find_architecture"]


class SearchSpaceError(Exception):
    """A search-space variable that cannot be built; ``field`` is the dotted suffix of its path."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def find_architecture(spec: Any, level: str, name: str) -> ArchitectureVariable:
    """The architecture variable a supernet in ``level`` names: it must exist in a level above."""
    ancestors: list[str] = []
    parent = spec.levels[level].parent
    while parent is not None and parent in spec.levels and parent not in ancestors:
        ancestors.append(parent)
        parent = spec.levels[parent].parent
    for lname, lspec in spec.levels.items():
        if name not in lspec.variables:
            continue
        variable = lspec.variables[name]
        if not isinstance(variable, ArchitectureVariable):
            raise SearchSpaceError(".architecture", f"{name!r} is a {variable.kind} variable of level {lname!r};"
                                   " expected an architecture variable ({kind: architecture, space: ...})")
        if lname not in ancestors:
            raise SearchSpaceError(".architecture", f"the architecture variable {name!r} is in level {lname!r}, which is"
                                   f" not above level {level!r}: the architecture belongs to an upper level")
        return variable
    names = [n for lspec in spec.levels.values() for n, v in lspec.variables.items() if isinstance(v, ArchitectureVariable)]
    raise SearchSpaceError(".architecture", f"no variable {name!r}; architecture variables: {', '.join(names) or 'none'}")


def build_variable_module(spec: Any, level: str, name: str, base_dir: Path) -> nn.Module:
    """The Architecture or Supernet module of variable ``name`` of ``level``."""
    variable = spec.levels[level].variables[name]
    if isinstance(variable, ArchitectureVariable):
        return MacroArchitecture(variable, base_dir) if variable.space.kind == "macro" else Architecture(variable, base_dir)
    if isinstance(variable, SupernetVariable):
        architecture = find_architecture(spec, level, variable.architecture)
        return MacroSupernet(architecture) if architecture.space.kind == "macro" else Supernet(architecture)
    raise SearchSpaceError("", f"variable {name!r} of kind {variable.kind!r} is not built from a search space")
