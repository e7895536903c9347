"""A batch of independent instances of one problem, solved together as one (see docs/instances.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from bilevel.spec._base import SpecModel

__all__ = ["VARYING_PATHS", "InstancesSpec"]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
VARYING_PATHS: tuple[tuple[str, str], ...] = (
    (r"run\.seed", "run.seed"),
    (rf"levels\.{_NAME}\.data\.kwargs(\.[^.]+)+", "levels.<level>.data.kwargs.<name>"),
    (rf"levels\.{_NAME}\.objective_kwargs\.{_NAME}", "levels.<level>.objective_kwargs.<name> (numbers only)"),
    (rf"levels\.{_NAME}\.variables\.{_NAME}\.(init|init_scale)", "levels.<level>.variables.<name>.init / init_scale"),
    (rf"levels\.{_NAME}\.variables\.{_NAME}\.kwargs\.{_NAME}", "levels.<level>.variables.<name>.kwargs.<name>"),
    (rf"(report|monitor)_kwargs\.{_NAME}", "report_kwargs.<name> / monitor_kwargs.<name>"),
)
"""What may differ between instances (pattern, description): everything else, the objectives,
solvers and shapes included, is shared, so that one batched computation serves them all."""


class InstancesSpec(SpecModel):
    """``count`` independent copies of the problem, solved as one batched problem: their
    variables are stacked along a new leading dimension, the objectives are evaluated with
    torch.func.vmap, and every engine step serves all instances at once. Instance i uses the
    seed run.seed + i unless ``vary`` sets run.seed; ``vary`` sets other per-instance values
    (data-source arguments, numeric objective arguments, initial values)."""

    count: Annotated[int, Field(ge=1)]
    """Number of instances."""
    vary: dict[str, list[Any] | Literal["index"]] = Field(default_factory=dict)
    """Dotted path in this spec -> one value per instance, or "index" for the instance's index
    0, ..., count - 1 (expanded to that list when the spec is read), e.g.
    {"levels.lower.data.kwargs.seed": [0, 1, 2, 3]} or {"levels.lower.data.kwargs.instance": "index"}. Allowed paths: run.seed,
    levels.<level>.data.kwargs.<name>, levels.<level>.objective_kwargs.<name> (numbers),
    levels.<level>.variables.<name>.init / init_scale / kwargs.<name>, report_kwargs.<name>,
    monitor_kwargs.<name>. Shapes must agree across instances."""

    @model_validator(mode="after")
    def _check_vary(self) -> "InstancesSpec":
        for path, values in list(self.vary.items()):
            if values == "index":
                self.vary[path] = values = list(range(self.count))
            if not any(re.fullmatch(pattern, path) for pattern, _ in VARYING_PATHS):
                allowed = "; ".join(description for _, description in VARYING_PATHS)
                raise ValueError(f"vary: {path!r} cannot differ between instances (allowed: {allowed})")
            if len(values) != self.count:
                raise ValueError(f"vary: {path!r} has {len(values)} values, expected one per instance ({self.count})")
            if ".objective_kwargs." in path and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(f"vary: {path!r} must list numbers (objective arguments become per-instance tensors)")
        return self
