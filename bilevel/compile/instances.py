"""The instances of a spec with ``instances``: one spec per instance, each with its own seed and
its own values of the paths that ``instances.vary`` lists (see docs/instances.md)."""

from __future__ import annotations

import copy
from typing import Any

from bilevel.spec.load import LoadedSpec, spec_from_data

__all__ = ["check_path", "instance_specs", "set_path"]


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if key.endswith("kwargs") else node[key]
    node[keys[-1]] = value


def check_path(loaded: LoadedSpec, path: str, field: str = "instances.vary") -> None:
    """The level, data source or variable a varying path names must exist in the spec (issues at
    ``field``.path)."""
    spec, where = loaded.spec, f"{field}.{path}"
    parts = path.split(".")
    if parts[0] != "levels":
        return
    level = spec.levels.get(parts[1])
    if level is None:
        raise loaded.error(where, f"no level {parts[1]!r} (levels: {', '.join(spec.levels)})")
    if parts[2] == "data" and level.data is None:
        raise loaded.error(where, f"level {parts[1]!r} has no data source")
    if parts[2] == "variables":
        variable = level.variables.get(parts[3])
        if variable is None:
            raise loaded.error(where, f"level {parts[1]!r} has no variable {parts[3]!r}")
        if (parts[4] == "kwargs") != (variable.kind == "module"):
            raise loaded.error(where, f"{parts[3]!r} is a {variable.kind} variable, which has no field {parts[4]!r}")


def instance_specs(loaded: LoadedSpec) -> list[LoadedSpec]:
    """One spec per instance, without ``instances``: instance k gets run.seed + k and the k-th
    value of each ``vary`` entry."""
    spec = loaded.spec
    assert spec.instances is not None
    for path in spec.instances.vary:
        check_path(loaded, path)
    base = spec.model_dump(mode="json")
    base.pop("instances")
    out = []
    for index in range(spec.instances.count):
        data = copy.deepcopy(base)
        data["run"]["seed"] = spec.run.seed + index
        for path, values in spec.instances.vary.items():
            set_path(data, path, values[index])
        out.append(spec_from_data(data, loaded.file, loaded.base_dir, loaded.lines))
    return out
