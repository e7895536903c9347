"""Cell search spaces for differentiable architecture search: the candidate operations, the cell
graph, and the spaces of convolutional cells (the DARTS CNN space) and of MLP cells (tabular
data), with the supernet options they share with the macro space (``mixed_op``,
``op_weighting``). ``bilevel.spec.search_space`` gathers every space into ``SearchSpace``.

Cells are validated here (acyclic, every node reachable from an input, known operation names,
enough incoming edges for ``keep``, a ``max_skip`` the derivation can meet), so a bad cell is a
spec error with a dotted path before anything is built."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from bilevel.nas.search_space import cell_graph, check_keep, check_skip_limit
from bilevel.spec._base import SpecModel

__all__ = ["CellSpec", "ConvOp", "ConvSearchSpace", "MLPOp", "MLPSearchSpace", "MixedOpKind", "OpWeighting"]


ConvOp = Literal[
    "none",
    "skip_connect",
    "max_pool_3x3",
    "avg_pool_3x3",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "conv_1x1",
    "conv_3x3",
    "sharp_sep_conv_3x3",
    "sharp_sep_conv_5x5",
    "sharp_dil_conv_3x3",
    "sharp_dil_conv_5x5",
]
"""Candidate operations of convolutional cells (DARTS's eight, plain ReLU-conv-BN 1x1 / 3x3, and
sharpDARTS's SharpSepConv, undilated or dilated by 2)."""

MLPOp = Literal["none", "skip_connect", "linear", "linear_relu", "linear_tanh", "linear_sigmoid", "relu", "tanh"]
"""Candidate operations of MLP cells on feature vectors (tabular data)."""


class CellSpec(SpecModel):
    """A cell: a directed acyclic graph whose edges carry mixed operations.

    Nodes are numbered: 0 .. inputs-1 are the inputs (the outputs of the previous cells),
    inputs .. inputs+nodes-1 the intermediate nodes; each intermediate node sums its incoming
    edges, and the cell's output concatenates all intermediate nodes."""

    inputs: Annotated[int, Field(ge=1, le=2)] = 2
    """Input nodes: 2 (the previous two cells, as DARTS) or 1 (the previous cell only)."""
    nodes: Annotated[int, Field(ge=1)] = 4
    """Intermediate nodes."""
    edges: list[tuple[int, int]] | None = None
    """Edges as [source, destination] pairs; None: the dense DARTS cell (every input and every
    earlier intermediate node feeds each intermediate node; 14 edges for 2 inputs and 4 nodes).
    Must form a DAG in which every intermediate node is reachable from an input."""
    keep: Annotated[int, Field(ge=1, validate_default=True)] = 2
    """Incoming edges kept per intermediate node when a discrete cell is derived (the strongest,
    excluding none; DARTS keeps 2). Every intermediate node needs at least this many incoming edges."""

    @field_validator("edges")
    @classmethod
    def _valid_graph(cls, edges: list[tuple[int, int]] | None, info: ValidationInfo) -> list[tuple[int, int]] | None:
        if "inputs" in info.data and "nodes" in info.data:
            cell_graph(info.data["inputs"], info.data["nodes"], edges)  # ValueError names the problem
        return edges

    @field_validator("keep")
    @classmethod
    def _keep_fits(cls, keep: int, info: ValidationInfo) -> int:
        if all(name in info.data for name in ("inputs", "nodes", "edges")):  # edges absent: already an error
            check_keep(cell_graph(info.data["inputs"], info.data["nodes"], info.data["edges"]), keep)
        return keep


def _check_ops(ops: list[str]) -> list[str]:
    duplicates = sorted({op for op in ops if ops.count(op) > 1})
    if duplicates:
        raise ValueError(f"operations listed more than once: {', '.join(duplicates)}")
    if not [op for op in ops if op != "none"]:
        raise ValueError("at least one operation other than none is needed")
    return ops


def _check_max_skip(value: int | None, info: ValidationInfo) -> int | None:
    ops, cell = info.data.get("ops"), info.data.get("cell")
    if ops is not None and cell is not None:  # either absent: already an error
        check_skip_limit(ops, cell.keep, cell.nodes, value)
    return value


MixedOpKind = Literal["separate", "entangled"]
"""separate: every candidate has its own weights (DARTS); entangled: candidates that differ only in
kernel size share one superposed weight (Sukthanker et al. 2024, TangleNAS)."""

OpWeighting = Literal["softmax", "max_w"]
"""softmax: candidates weighted by softmax(alpha) (DARTS); max_w: by 1 - max softmax(alpha) +
softmax(alpha) (sharpDARTS's MaxW, Hundt et al. 2019)."""


def _check_entangled(value: str, info: ValidationInfo) -> str:
    ops = info.data.get("ops")
    if value == "entangled" and ops is not None:
        from bilevel.nas.entangled import ENTANGLED_FAMILIES, entangled_groups

        if not entangled_groups(ops):
            families: dict[str, list[str]] = {}
            for name, (family, _) in ENTANGLED_FAMILIES.items():
                families.setdefault(family, []).append(name)
            listed = "; ".join(" / ".join(m) for m in families.values())
            raise ValueError(f"mixed_op entangled shares one weight between candidates of one family that differ only in kernel"
                             f" size ({listed}); ops has no two candidates of one family, so nothing would be shared")
    return value


def _check_partial(value: int, info: ValidationInfo, width_field: str) -> int:
    width = info.data.get(width_field)
    if width is not None and width % value:
        raise ValueError(f"{width_field} ({width}) must be divisible by partial_channels ({value})")
    return value


class ConvSearchSpace(SpecModel):
    """Convolutional cells stacked into a network (the DARTS CNN space): a 3x3 conv stem, ``cells``
    cells of which the reduction cells halve the resolution and double the channels, global
    average pooling and a linear classifier. Normal and reduction cells have their own architecture."""

    kind: Literal["conv"] = "conv"
    """Discriminator: convolutional cells on images."""
    ops: list[ConvOp]
    """Candidate operations on every edge (none = zero, skip_connect = identity, or a factorized
    reduction on stride-2 edges)."""
    cell: CellSpec = Field(default_factory=CellSpec)
    """The cell graph shared by normal and reduction cells."""
    cells: Annotated[int, Field(ge=1)] = 8
    """Cells in the network."""
    reductions: list[Annotated[int, Field(ge=0)]] | None = None
    """Indices of the reduction cells; None: cells // 3 and 2 * cells // 3 (as DARTS)."""
    channels: Annotated[int, Field(ge=1)] = 16
    """Channels of the first cells (doubled at each reduction)."""
    stem_multiplier: Annotated[int, Field(ge=1)] = 3
    """The stem outputs stem_multiplier * channels channels."""
    in_channels: Annotated[int, Field(ge=1)] = 3
    """Channels of the input images."""
    classes: Annotated[int, Field(ge=2)] = 10
    """Output classes."""
    partial_channels: Annotated[int, Field(ge=1)] = 1
    """PC-DARTS (Xu et al. 2020): 1/K of the channels go through each mixed operation, the rest
    bypass it, then channels are shuffled; 1 = off (every channel, as DARTS). Cuts the memory of
    the mixed operations about K times."""
    edge_normalization: bool = False
    """PC-DARTS edge normalization: each node weighs its incoming edges by softmax(beta) over
    them, beta being extra architecture parameters; edges are selected by beta times alpha."""
    max_skip: Annotated[int, Field(ge=0)] | None = None
    """At most this many skip connections in the derived normal cell (P-DARTS, Chen et al. 2019):
    the weakest extra skips are replaced by their edge's best other operation, so a limit below
    the cell's kept edges needs an operation other than none and skip_connect. None: no limit."""
    mixed_op: MixedOpKind = "separate"
    """separate: one weight per candidate (DARTS); entangled: candidates of one family that differ
    only in kernel size (sep_conv_3x3 / sep_conv_5x5, dil_conv_3x3 / 5x5, conv_1x1 / conv_3x3 and
    the sharp_ ones) are one operation at the largest kernel whose smaller kernels are its centre
    (Sukthanker et al. 2024, "Weight-Entanglement Meets Gradient-Based Neural Architecture
    Search"): fewer parameters and activations; the derived cell is the same kind of cell."""
    op_weighting: OpWeighting = "softmax"
    """softmax: candidates weighted by softmax(alpha); max_w: by 1 - max softmax(alpha) +
    softmax(alpha), so the strongest candidate has weight 1 (sharpDARTS's MaxW DARTS, Hundt et
    al. 2019). The genotype is derived from softmax(alpha) either way."""

    @field_validator("ops")
    @classmethod
    def _ops(cls, ops: list[str]) -> list[str]:
        return _check_ops(ops)

    @field_validator("max_skip")
    @classmethod
    def _max_skip(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_max_skip(value, info)

    @field_validator("mixed_op")
    @classmethod
    def _entangled(cls, value: str, info: ValidationInfo) -> str:
        return _check_entangled(value, info)

    @field_validator("reductions")
    @classmethod
    def _reductions(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        cells = info.data.get("cells")
        if value is not None and cells is not None:
            bad = [i for i in value if i >= cells]
            if bad:
                raise ValueError(f"reduction cell indices {bad} are out of range; cells are 0..{cells - 1}")
        return value

    @field_validator("partial_channels")
    @classmethod
    def _partial(cls, value: int, info: ValidationInfo) -> int:
        return _check_partial(value, info, "channels")

    def reduction_cells(self) -> list[int]:
        """Indices of the reduction cells."""
        if self.reductions is not None:
            return sorted(set(self.reductions))
        return sorted({self.cells // 3, 2 * self.cells // 3})

    @property
    def cell_types(self) -> tuple[str, ...]:
        """The kinds of cells that have their own architecture."""
        return ("normal", "reduce") if self.reduction_cells() else ("normal",)


class MLPSearchSpace(SpecModel):
    """MLP cells on feature vectors (tabular data): a linear stem to ``width`` features, ``cells``
    cells whose edges choose among linear maps and activations, and a linear classifier."""

    kind: Literal["mlp"] = "mlp"
    """Discriminator: MLP cells on feature vectors."""
    ops: list[MLPOp]
    """Candidate operations on every edge."""
    cell: CellSpec = Field(default_factory=CellSpec)
    """The cell graph."""
    cells: Annotated[int, Field(ge=1)] = 2
    """Cells in the network."""
    width: Annotated[int, Field(ge=1)] = 64
    """Features of every node."""
    in_features: Annotated[int, Field(ge=1)]
    """Features of the input."""
    classes: Annotated[int, Field(ge=2)]
    """Output classes."""
    partial_channels: Annotated[int, Field(ge=1)] = 1
    """As for conv spaces: 1/K of the features go through each mixed operation."""
    edge_normalization: bool = False
    """As for conv spaces: softmax(beta) weights over each node's incoming edges."""
    max_skip: Annotated[int, Field(ge=0)] | None = None
    """At most this many skip connections in the derived cell (as for conv spaces). None: no limit."""
    op_weighting: OpWeighting = "softmax"
    """As for conv spaces: softmax(alpha), or sharpDARTS's MaxW weights."""
    mixed_op: Literal["separate"] = "separate"
    """Always separate: entangled candidates share the kernel of a convolution, and feature-vector
    operations have none."""

    @field_validator("mixed_op", mode="before")
    @classmethod
    def _no_entangled(cls, value: Any) -> Any:
        if value == "entangled":
            raise ValueError("entangled candidates share one convolution kernel (a 3x3 as the centre of a 5x5); MLP"
                             " cells have no kernel sizes to entangle: use a conv or macro space, or mixed_op separate")
        return value

    @field_validator("ops")
    @classmethod
    def _ops(cls, ops: list[str]) -> list[str]:
        return _check_ops(ops)

    @field_validator("max_skip")
    @classmethod
    def _max_skip(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_max_skip(value, info)

    @field_validator("partial_channels")
    @classmethod
    def _partial(cls, value: int, info: ValidationInfo) -> int:
        return _check_partial(value, info, "width")

    def reduction_cells(self) -> list[int]:
        return []

    @property
    def cell_types(self) -> tuple[str, ...]:
        return ("normal",)
