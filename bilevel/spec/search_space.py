"""Search spaces for differentiable architecture search: cells, candidate operations, the
architecture variable (upper level) and the supernet variable (lower level) that relaxes it.

One declaration serves both levels: the architecture variable holds the search space, and the
supernet variable names the architecture variable it relaxes::

    upper:  variables: {arch: {kind: architecture, space: {kind: conv, ops: [...], cell: {...}}}}
    lower:  variables: {net: {kind: supernet, architecture: arch}}

The spaces themselves are defined in ``bilevel.spec.cell_space`` (conv and MLP cells, validated
there so that a bad cell is a spec error with a dotted path before anything is built) and
``bilevel.spec.macro_space`` (a chain of layers choosing kernel sizes and widths); this module
gathers them into ``SearchSpace`` and re-exports them."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from bilevel.spec._base import Reference, SpecModel
from bilevel.spec.cell_space import CellSpec, ConvOp, ConvSearchSpace, MLPOp, MLPSearchSpace, MixedOpKind, OpWeighting
from bilevel.spec.macro_space import MacroSearchSpace

__all__ = [
    "ArchitectureVariable",
    "CellSpec",
    "ConvOp",
    "ConvSearchSpace",
    "MLPOp",
    "MLPSearchSpace",
    "MacroSearchSpace",
    "MixedOpKind",
    "OpWeighting",
    "RetrainSpec",
    "SearchSpace",
    "SupernetVariable",
]


SearchSpace = Annotated[Union[ConvSearchSpace, MLPSearchSpace, MacroSearchSpace], Field(discriminator="kind")]
"""A search space: {kind: conv, ...}, {kind: mlp, ...} or {kind: macro, ...}."""


class RetrainSpec(SpecModel):
    """How a derived architecture is trained from scratch and evaluated (the report and
    `bilevel retrain` use it): SGD with momentum, a learning-rate schedule (cosine to zero by
    default), weight decay."""

    data: Reference
    """Callable returning {"train": {"x": X, "y": Y}, "test": {"x": X, "y": Y}}."""
    data_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to data."""
    epochs: Annotated[int, Field(ge=1)] = 20
    """Passes over the training data."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """Examples per step."""
    lr: Annotated[float, Field(gt=0)] = 0.025
    """Peak learning rate of the schedule."""
    schedule: Literal["constant", "cosine", "linear", "cosine_power"] = "cosine"
    """Learning-rate schedule over all steps, from lr to lr * final_lr_ratio (``bilevel.schedules``):
    cosine (DARTS), or cosine_power (sharpDARTS's cosine power annealing, base power_base)."""
    final_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    """The schedule's end as a fraction of lr (sharpDARTS's training: 1e-8 / 0.025, about 0)."""
    power_base: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 2.0
    """cosine_power: the base k (sharpDARTS: 2); 1 is cosine."""
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    """Epochs of linear warm-up to lr before the decay (sharpDARTS: 5)."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Heavy-ball momentum."""
    weight_decay: Annotated[float, Field(ge=0)] = 3e-4
    """L2 weight decay."""
    channels: Annotated[int, Field(ge=1)] | None = None
    """Channels (conv) or width (mlp) of the retrained network; None: the search space's."""
    cells: Annotated[int, Field(ge=1)] | None = None
    """Cells of the retrained network; None: the search space's (reductions at cells // 3 and
    2 * cells // 3 when this differs)."""
    seed: int = 0
    """Seed of the initialization and of the minibatch order."""
    repeats: Annotated[int, Field(ge=1)] = 1
    """Train from scratch this many times (seeds seed, seed + 1, ...) and report the mean test
    accuracy and its spread: one retraining is a noisy measure of an architecture."""


class ArchitectureVariable(SpecModel):
    """Architecture mixture weights (upper level): one row of logits alpha over the candidate
    operations per edge and cell type, softmaxed into mixture weights (DARTS); with edge
    normalization also one logit beta per edge. Objectives call ``upper["arch"]()`` to get the
    mixture weights, which the supernet takes: ``lower["net"](x, upper["arch"]())``."""

    kind: Literal["architecture"] = "architecture"
    """Discriminator: architecture mixture weights."""
    space: SearchSpace
    """The search space (shared with the supernet that names this variable)."""
    init_scale: Annotated[float, Field(ge=0)] = 1e-3
    """alpha starts at init_scale * N(0, 1) (DARTS: 1e-3, nearly uniform mixtures)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Weight steps before the architecture starts to move (taken in the first outer step), so that
    parametric operations are trained before they are judged (PC-DARTS: 15 of 50 epochs). Read by
    the engines of the DARTS family (darts, rarts) unless their own warmup_steps is set."""
    retrain: RetrainSpec | None = None
    """How the derived architecture is retrained and tested at the end of a run; None: not retrained."""

    @field_validator("retrain")
    @classmethod
    def _retrain_fits_the_space(cls, retrain: RetrainSpec | None, info: ValidationInfo) -> RetrainSpec | None:
        space = info.data.get("space")
        if retrain is not None and isinstance(space, MacroSearchSpace):
            given = [name for name in ("channels", "cells") if getattr(retrain, name) is not None]
            if given:
                raise ValueError(f"retrain.{given[0]} resizes a cell network; a macro architecture fixes its layers and"
                                 " widths (the search chose them): leave it unset")
        return retrain


class SupernetVariable(SpecModel):
    """The weights of the supernet (lower level): the network of mixed operations built from the
    search space of the architecture variable it names."""

    kind: Literal["supernet"] = "supernet"
    """Discriminator: the supernet of an architecture variable."""
    architecture: str
    """Name of the architecture variable (in a level above this one) whose search space is relaxed."""

    @model_validator(mode="after")
    def _identifier(self) -> "SupernetVariable":
        if not self.architecture.isidentifier():
            raise ValueError(f"architecture must name a variable (got {self.architecture!r})")
        return self
