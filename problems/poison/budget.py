"""The attacker's budget, declared in the spec and validated like the spec itself."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PoisonBudget"]


class PoisonBudget(BaseModel):
    """What the attacker may change: which share of the training set, and by how much per pixel.

    Declare it once in a spec (a YAML anchor, ``budget: &budget {fraction: 0.1, epsilon: 0.25}``)
    and refer to it wherever it is used (``*budget``). Out-of-range values are spec errors at
    their dotted path (``bilevel validate`` exits 2).

    Both numbers must be finite. ``epsilon`` is at most 1 because every data source of the
    poisoning problems gives images with pixel values in [0, 1] (``PoisonData`` checks it when it
    loads them) and poisoned images are clipped to [0, 1]: no pixel can change by more than 1, so
    an epsilon above 1 is not a larger budget but a unit mistake (pixel values in 0..255, say).
    The poisoning problems have no standardized-feature data source (the breast-cancer set of
    ``problems.hpo`` is standardized and unbounded); one would need its own bound on epsilon, in
    standard deviations, and its own range instead of the clipping."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    fraction: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    """Fraction of the training examples the attacker modifies, in [0, 1]."""
    epsilon: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    """L-infinity bound on the change of each pixel, in [0, 1] (images in [0, 1]); poisoned images
    are also kept in [0, 1], which only shrinks the change."""

    def count(self, n: int) -> int:
        """Number of poisoned examples among n: round(fraction * n)."""
        return int(round(self.fraction * n))
