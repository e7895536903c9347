"""The macro search space (TangleNAS, Sukthanker et al. 2024): a chain of convolutional layers,
each choosing its kernel size and its width, searched with a weight-entangled supernet
(``bilevel.nas.macro``) or with one convolution per candidate."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from bilevel.spec._base import SpecModel
from bilevel.spec.cell_space import MixedOpKind, OpWeighting

__all__ = ["MacroSearchSpace"]


class MacroSearchSpace(SpecModel):
    """A chain of convolutional layers, each choosing its kernel size and its width (the macro
    spaces of TangleNAS, Sukthanker et al. 2024): layer l is conv(k_l x k_l, w_l channels) ->
    BatchNorm -> ReLU (2x2 max pooling after the layers in ``pool_after``), then global average
    pooling and a linear classifier. The architecture has one row of logits over ``kernels`` and
    one over ``widths`` per layer; candidate (k, w) of a layer has weight softmax_k * softmax_w."""

    kind: Literal["macro"] = "macro"
    """Discriminator: a macro space of kernel sizes and widths."""
    layers: Annotated[int, Field(ge=1)] = 4
    """Convolutional layers."""
    kernels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [3, 5, 7])
    """Kernel sizes every layer chooses among; odd (a smaller kernel is the centre of the largest
    in the entangled supernet, and only odd sizes have a centre) and distinct."""
    widths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [8, 16, 32])
    """Output channels every layer chooses among; distinct. A narrower layer is the first w channels
    of the widest in the entangled supernet."""
    pool_after: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [1, 2])
    """Indices of the layers followed by 2x2 max pooling (8x8 digits: 8 -> 4 -> 2)."""
    in_channels: Annotated[int, Field(ge=1)] = 1
    """Channels of the input images."""
    classes: Annotated[int, Field(ge=2)] = 10
    """Output classes."""
    mixed_op: MixedOpKind = "entangled"
    """entangled: each layer holds one weight of the largest kernel and width, the candidates being
    its centred k x k kernels and its first w channels, superposed (Sukthanker et al. 2024);
    separate: one convolution per (kernel, width) candidate, mixed as DARTS mixes operations (the
    one-weight-per-candidate supernet the entangled one is compared with)."""
    op_weighting: OpWeighting = "softmax"
    """As for cell spaces: softmax weights, or sharpDARTS's MaxW weights (per row)."""

    @field_validator("kernels")
    @classmethod
    def _kernels(cls, kernels: list[int]) -> list[int]:
        if not kernels:
            raise ValueError("at least one kernel size is needed")
        even = [k for k in kernels if k % 2 == 0]
        if even:
            raise ValueError(f"kernel sizes {even} are even: an entangled layer holds every kernel as the centre of the"
                             f" largest ({max(kernels)}x{max(kernels)}), and an even kernel has no centre in an odd one nor"
                             " keeps the image size; use odd sizes such as 3, 5, 7")
        if len(set(kernels)) != len(kernels):
            raise ValueError(f"kernel sizes listed more than once: {sorted({k for k in kernels if kernels.count(k) > 1})}")
        return kernels

    @field_validator("widths")
    @classmethod
    def _widths(cls, widths: list[int], info: ValidationInfo) -> list[int]:
        if not widths:
            raise ValueError("at least one width is needed")
        if len(set(widths)) != len(widths):
            raise ValueError(f"widths listed more than once: {sorted({w for w in widths if widths.count(w) > 1})}")
        kernels = info.data.get("kernels")
        if kernels is not None and len(kernels) * len(widths) < 2:
            raise ValueError("one kernel size and one width leave nothing to search: give at least two of either")
        return widths

    @field_validator("pool_after")
    @classmethod
    def _pools(cls, value: list[int], info: ValidationInfo) -> list[int]:
        layers = info.data.get("layers")
        if layers is not None:
            bad = [i for i in value if i >= layers]
            if bad:
                raise ValueError(f"pool_after indices {bad} are out of range; layers are 0..{layers - 1}")
        if len(set(value)) != len(value):
            raise ValueError("pool_after lists a layer more than once")
        return value

    @property
    def choices(self) -> dict[str, list[int]]:
        """The architecture's rows: "kernel" -> kernel sizes, "width" -> widths."""
        return {"kernel": list(self.kernels), "width": list(self.widths)}

    @property
    def cell_types(self) -> tuple[str, ...]:
        """A macro space has no cells; its architecture has the rows of :attr:`choices`."""
        return ()
