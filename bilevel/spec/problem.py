"""The whole problem spec: levels forming a graph, the engine, run settings and a report hook."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Union

import networkx as nx
from pydantic import Field, field_validator
from pydantic.fields import FieldInfo

from bilevel.spec._base import ModuleRef, Reference, SpecModel
from bilevel.spec.engine import AutoEngine
from bilevel.spec.instances import InstancesSpec
from bilevel.spec.level import LevelSpec
from bilevel.spec.run import RunSpec
from bilevel.spec.tasks import TasksSpec

__all__ = ["BilevelSpec", "engine_union", "level_graph", "use_engine_configs"]


class BilevelSpec(SpecModel):
    """A bilevel (or multilevel) problem.

    Levels form a tree through ``parent``: the top level has no parent, every other level is
    solved given the levels above it. Two levels is the common case."""

    name: str = "bilevel-problem"
    """A short name, used in outputs."""
    levels: dict[str, LevelSpec]
    """Levels by name."""
    engine: Annotated[Union[AutoEngine], Field(discriminator="kind")] = Field(default_factory=AutoEngine)
    """Hypergradient engine: {kind: auto} lets the planner choose, or one registered engine's
    configuration (``bilevel engines`` lists them; the union grows as engines register)."""
    run: RunSpec = Field(default_factory=RunSpec)
    """Run settings."""
    plugins: list[ModuleRef] = Field(default_factory=list)
    """Modules imported before the rest of the spec is validated, for engines defined outside the
    package: "path/to/my_engine.py" (relative to the spec file) or "package.module". Importing a
    plugin runs its code, which registers its engines (docs/howto/new-engine.md)."""
    report: Reference | None = None
    """Optional f(upper, lower) -> dict of numbers evaluated at the end of a run (test accuracy, ...)."""
    report_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments bound to the report function. A report function with a parameter named
    ``out_dir`` also receives the run's output directory, to write figures or tables there."""
    monitor: Reference | None = None
    """Optional f(upper, lower, *, step, out_dir) -> dict of numbers (or lists of numbers), called
    every ``run.monitor_every`` outer steps; its values go into that step's metrics.jsonl record
    under "monitor" (hyperparameter trajectories, a derived architecture, a validation accuracy).
    It may also write files into out_dir."""
    monitor_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments bound to the monitor function."""
    tasks: TasksSpec | None = None
    """Meta-learning: a distribution of tasks, each solved by the level below the top on its support
    set and scored by the top objective on its query set (docs/howto/meta-learning.md). None: one
    lower problem."""
    instances: InstancesSpec | None = None
    """Solve a batch of independent instances of this problem as one (differing by seed, data
    arguments, numeric objective arguments or initial values); results are reported per instance.
    None: one instance."""

    @field_validator("levels")
    @classmethod
    def _valid_graph(cls, levels: dict[str, LevelSpec]) -> dict[str, LevelSpec]:
        level_graph(levels)  # raises ValueError with a readable message
        seen: dict[str, str] = {}
        for lname, level in levels.items():
            for vname in level.variables:
                if vname in seen:
                    raise ValueError(
                        f"variable {vname!r} is declared in both levels {seen[vname]!r} and {lname!r};"
                        " variable names must be unique"
                    )
                seen[vname] = lname
        return levels


def level_graph(levels: dict[str, LevelSpec]) -> nx.DiGraph:
    """The level graph (edge parent -> child), checked to be a rooted tree of at least two levels."""
    graph = nx.DiGraph()
    graph.add_nodes_from(levels)
    for name, level in levels.items():
        if level.parent is None:
            continue
        if level.parent not in levels:
            raise ValueError(
                f"level {name!r} has parent {level.parent!r}, which is not a level"
                f" (levels: {', '.join(sorted(levels))})"
            )
        graph.add_edge(level.parent, name)
    if len(graph) < 2:
        raise ValueError("a bilevel problem needs at least two levels (an upper and a lower)")
    cycles = list(nx.simple_cycles(graph))
    if cycles:
        cycle = cycles[0]
        raise ValueError("levels form a cycle: " + " -> ".join([*cycle, cycle[0]]))
    roots = [n for n in graph if graph.in_degree(n) == 0]
    if len(roots) != 1 or not nx.is_weakly_connected(graph):
        raise ValueError(
            "levels must form one connected tree with a single top level; top levels found: "
            + ", ".join(sorted(roots))
        )
    return graph


def engine_union(configs: Sequence[type]) -> Any:
    """The annotation of ``BilevelSpec.engine`` for these engine configs (plus auto)."""
    return Annotated[Union[(AutoEngine, *configs)], Field(discriminator="kind")]  # type: ignore[return-value]


def use_engine_configs(configs: Sequence[type]) -> None:
    """Make ``BilevelSpec.engine`` accept exactly auto and ``configs`` (called by the engine
    registry whenever an engine registers), so that the schema and validation follow the registry."""
    current = BilevelSpec.model_fields["engine"]
    BilevelSpec.model_fields["engine"] = FieldInfo.from_annotated_attribute(
        engine_union(configs), Field(default_factory=AutoEngine, description=current.description))
    BilevelSpec.model_rebuild(force=True)
