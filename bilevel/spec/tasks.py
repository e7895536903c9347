"""Meta-learning over a distribution of tasks: where tasks come from and how they are batched
(see docs/howto/meta-learning.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from bilevel.spec._base import Reference, SpecModel

__all__ = ["ProxSpec", "TasksSpec"]


class TasksSpec(SpecModel):
    """A distribution of tasks: each outer step samples ``meta_batch`` of them; the level below the
    top is solved for each task on its support set (all tasks at once, stacked), and the top
    objective is evaluated on each task's query set, the per-task values reduced to one."""

    sampler: Reference
    """f(count, generator, **kwargs) -> {"support": {name: Tensor}, "query": {name: Tensor}}: ``count``
    tasks drawn with the torch.Generator, every tensor with a leading dimension of ``count`` (one
    row per task) and the same names in support and query."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the sampler (e.g. shots, ways, the meta-training split)."""
    meta_batch: Annotated[int, Field(ge=1)] = 25
    """Tasks per outer step."""
    reduce: Literal["mean", "sum"] = "mean"
    """How the per-task query losses make the upper objective."""
    seed: int = 0
    """Seed of the task stream (meta-training); meta-test tasks are drawn from seed + 1_000_003."""
    test_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments that replace ``kwargs`` for meta-test tasks (e.g. {split: test}, a query grid)."""
    test_sampler: Reference | None = None
    """A separate sampler for meta-test tasks (None: ``sampler`` with ``test_kwargs``)."""
    test_tasks: Annotated[int, Field(ge=1)] = 600
    """Meta-test tasks evaluated at the end of a run (result.json's ``meta_test``)."""
    test_steps: list[Annotated[int, Field(ge=0)]] | None = None
    """Adaptation steps after which meta-test tasks are scored (None: 0, 1 and the inner solver's steps)."""
    metrics: Reference | None = None
    """Optional f(upper, lower, batch) -> {name: scalar Tensor} per task on its query set after
    adaptation (e.g. accuracy), reported by the meta-test beside the query loss."""


class ProxSpec(SpecModel):
    """A proximal term lam/2 ||y - anchor||^2 added to a lower level's objective, tying its solution
    to upper variables (iMAML: the task solution stays near the meta-parameters, so the implicit
    function theorem gives the meta-gradient)."""

    anchor: str | dict[str, str]
    """The upper variable the lower variables are pulled to (the lower level's only variable), or a
    mapping lower variable -> upper variable of the same shape."""
    lam: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """lam > 0: the strength of the proximal term (iMAML's regularization)."""
