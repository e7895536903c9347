"""Constraints: functional constraints of a level and simple sets for variables."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from bilevel.spec._base import Reference, SpecModel

__all__ = ["BoxSet", "ConstraintSpec", "SimplexSet", "VariableSet"]


class ConstraintSpec(SpecModel):
    """A functional constraint c(upper, lower, batch) <= 0 (inequality) or == 0 (equality).

    The constraint function follows the objective signature and returns a Tensor of values.
    ``coupled`` declares that it depends on the upper variables too (the case LV-HBA targets)."""

    fn: Reference
    """Reference to the constraint function, "module:attr" or "file.py:attr"."""
    kind: Literal["inequality", "equality"] = "inequality"
    """inequality: feasible where fn <= 0; equality: feasible where fn == 0."""
    coupled: bool = False
    """Whether the constraint involves the upper level's variables."""
    affine: bool = False
    """Declares fn affine in (upper, lower) variables: engines that project onto the feasible set
    (LV-HBA) then project exactly; otherwise they only penalize/dualize it."""
    shape: list[Annotated[int, Field(ge=1)]] | None = None
    """Shape of fn's value (the number of constraints); checked when compiling. None: any."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments bound to fn."""


class BoxSet(SpecModel):
    """The box {v : low <= v <= high}, elementwise; either bound may be omitted."""

    kind: Literal["box"] = "box"
    """Discriminator: a box."""
    low: float | None = None
    """Lower bound (None: unbounded below)."""
    high: float | None = None
    """Upper bound (None: unbounded above)."""

    @model_validator(mode="after")
    def _ordered(self) -> "BoxSet":
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"box low ({self.low}) must not exceed high ({self.high})")
        return self


class SimplexSet(SpecModel):
    """The scaled simplex {v : v >= 0, sum(v) = radius} over all entries of the variable
    (mixture weights, example weights that must sum to a budget)."""

    kind: Literal["simplex"] = "simplex"
    """Discriminator: a simplex."""
    radius: Annotated[float, Field(gt=0)] = 1.0
    """The entries' sum."""


def _set_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("kind", "box")
    return getattr(value, "kind", None)


VariableSet = Annotated[
    Union[Annotated[BoxSet, Tag("box")], Annotated[SimplexSet, Tag("simplex")]],
    Discriminator(_set_kind),
]
"""A simple set a variable is projected onto after every update."""
