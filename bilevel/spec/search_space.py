"""Search spaces for differentiable architecture search: cells, candidate operations, the
architecture variable (upper level) and the supernet variable (lower level) that relaxes it.

One declaration serves both levels: the architecture variable holds the search space, and the
supernet variable names the architecture variable it relaxes::

    upper:  variables: {arch: {kind: architecture, space: {kind: conv, ops: [...], cell: {...}}}}
    lower:  variables: {net: {kind: supernet, architecture: arch}}

Cells are validated here (acyclic, every node reachable from an input, known operation names,
enough incoming edges for ``keep``, a ``max_skip`` the derivation can meet), so a bad cell is a
spec error with a dotted path before anything is built."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from bilevel.nas.search_space import cell_graph, check_keep, check_skip_limit
from bilevel.spec._base import SpecModel

__all__ = [
    "ArchitectureVariable",
    "CellSpec",
    "ConvOp",
    "ConvSearchSpace",
    "MLPOp",
    "MLPSearchSpace",
    "MacroSearchSpace",
    "RetrainSpec",
    "SearchSpace",
    "SupernetVariable",
]

_Ref = Annotated[str, Field(pattern=r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_.]*$")]

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


SearchSpace = Annotated[Union[ConvSearchSpace, MLPSearchSpace, MacroSearchSpace], Field(discriminator="kind")]
"""A search space: {kind: conv, ...}, {kind: mlp, ...} or {kind: macro, ...}."""


class RetrainSpec(SpecModel):
    """How a derived architecture is trained from scratch and evaluated (the report and
    `bilevel retrain` use it): SGD with momentum, a learning-rate schedule (cosine to zero by
    default), weight decay."""

    data: _Ref
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
