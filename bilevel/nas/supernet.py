"""The continuous relaxation: mixed operations, the architecture parameters, the supernet.

DARTS (Liu et al. 2019) replaces the choice of an operation on edge (i, j) by the mixture

    o_{i,j}(x) = sum_o softmax(alpha_{i,j})_o o(x),

so the architecture alpha (one row per edge and cell type) is continuous and the network's
weights w and alpha are trained as the lower and upper variables of a bilevel problem.

PC-DARTS (Xu et al. 2020, "PC-DARTS: Partial Channel Connections for Memory-Efficient Architecture
Search", ICLR) sends only 1/K of the channels through the mixture and passes the rest by (max-pooled
on stride-2 edges), then shuffles channels (K groups), cutting the mixture's memory about K times.
Its edge normalization weighs the edges into node j by softmax over them of extra parameters beta:

    x_j = sum_{i -> j} softmax_{i' -> j}(beta_{i',j})_i o_{i,j}(x_i).

MaxW (Hundt et al. 2019, "sharpDARTS", section 3.2; ``weighting_algorithm max_w`` of the official
code) weighs each candidate by 1 - max_o' w_o' + w_o instead of w_o: the strongest candidate
enters with weight 1 and the others relative to it, so the mixture is closer to the network the
derived cell will be. The genotype is still derived from the softmax weights w.

Entangled mixed operations (``mixed_op: entangled``; Sukthanker et al. 2024) let candidates that
differ only in kernel size share one superposed weight (``bilevel.nas.entangled``).

The ``none`` operation's term is zero and is skipped (same value and gradient)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.nas.entangled import EntangledConvOp, entangled_groups
from bilevel.nas.network import CellNetwork
from bilevel.nas.ops import conv_op, mlp_op
from bilevel.nas.search_space import cell_edges, cell_graph, incoming

__all__ = ["Architecture", "ArchitectureWeights", "MixedOp", "Supernet", "channel_shuffle", "max_w"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave ``groups`` groups of channels (dimension 1), as ShuffleNet / PC-DARTS."""
    batch, channels = x.shape[:2]
    rest = x.shape[2:]
    return x.reshape(batch, groups, channels // groups, *rest).transpose(1, 2).reshape(batch, channels, *rest)


def max_w(weights: Tensor) -> Tensor:
    """sharpDARTS's MaxW weighting of mixture weights (last dimension): 1 - max_o w_o + w_o."""
    return 1.0 - weights.amax(dim=-1, keepdim=True) + weights


class MixedOp(nn.Module):
    """sum_o w_o o(x) over the candidate operations, on 1/K of the channels when partial (K > 1);
    with ``weighting = "max_w"`` the weights are MaxW's, with ``mixed_op = "entangled"`` each
    family of kernel sizes is one superposed operation (``EntangledConvOp``)."""

    def __init__(self, kind: str, ops: Sequence[str], channels: int, stride: int, partial: int = 1,
                 mixed_op: str = "separate", weighting: str = "softmax"):
        super().__init__()
        self.partial = partial
        self.weighting = weighting
        self.names = list(ops)
        width = channels // partial
        families = entangled_groups(ops) if mixed_op == "entangled" else {}
        shared = {name for members in families.values() for name in members}
        single = [i for i, name in enumerate(ops) if name not in shared]
        self.ops = nn.ModuleList(
            conv_op(ops[i], width, stride, affine=False, search=True) if kind == "conv" else mlp_op(ops[i], width) for i in single
        )
        self.active = [(i, k) for k, i in enumerate(single) if ops[i] != "none"]  # (row of the weights, module)
        self.families = nn.ModuleList(EntangledConvOp(members, width, stride, affine=False, search=True) for members in families.values())
        self.family_rows = [[self.names.index(n) for n in members] for members in families.values()]
        self.bypass = nn.MaxPool2d(2, 2) if partial > 1 and stride == 2 else nn.Identity()

    @property
    def terms(self) -> int:
        """Weighted terms of the mixture: one per active candidate, one per entangled family."""
        return len(self.active) + len(self.families)

    def _mix(self, x: Tensor, weights: Tensor) -> Tensor:
        if self.weighting == "max_w":
            weights = max_w(weights)
        total = None
        for i, k in self.active:
            term = weights[i] * self.ops[k](x)
            total = term if total is None else total + term
        for family, rows in zip(self.families, self.family_rows):
            w = weights[rows]
            mass = w.sum()
            term = mass * family(x, w / mass.clamp_min(torch.finfo(w.dtype).tiny))  # a family of weight 0 adds 0
            total = term if total is None else total + term
        return total  # type: ignore[return-value]

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        if self.partial == 1:
            return self._mix(x, weights)
        width = x.shape[1] // self.partial
        mixed = self._mix(x[:, :width], weights)
        return channel_shuffle(torch.cat([mixed, self.bypass(x[:, width:])], dim=1), self.partial)


class ArchitectureWeights(Mapping[str, Tensor]):
    """The mixture weights an architecture variable evaluates to: ``weights["normal"]`` (E, O) =
    softmax(alpha) per edge, ``"reduce"`` likewise for conv spaces with reduction cells, and
    ``"edge_normal"`` / ``"edge_reduce"`` (E,) with edge normalization. Carries its spec (the
    search space) and the cell graph, so a genotype can be derived from it alone."""

    def __init__(self, weights: dict[str, Tensor], spec: Any, base_dir: Path, edges: list[tuple[int, int]]):
        self._weights = weights
        self.spec = spec
        self.space = spec.space
        self.base_dir = base_dir
        self.edges = edges

    def __getitem__(self, key: str) -> Tensor:
        return self._weights[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


class Architecture(nn.Module):
    """The architecture parameters of a search space: alpha (E, O) per cell type (parameters
    named ``normal``, ``reduce``) and, with edge normalization, beta (E,) per cell type
    (``edge_normal``, ``edge_reduce``). Calling it returns the softmaxed ArchitectureWeights."""

    def __init__(self, spec: Any, base_dir: Path | None = None):
        super().__init__()
        self.spec = spec
        self.base_dir = base_dir or Path.cwd()
        space = spec.space
        graph = cell_graph(space.cell.inputs, space.cell.nodes, space.cell.edges)
        n_edges, n_ops = graph.number_of_edges(), len(space.ops)
        self.edges = cell_edges(graph)
        self._segments = [rows for _, rows in sorted(incoming(graph).items())]
        for cell_type in space.cell_types:
            self.register_parameter(cell_type, nn.Parameter(spec.init_scale * torch.randn(n_edges, n_ops)))
        if space.edge_normalization:
            for cell_type in space.cell_types:
                self.register_parameter(f"edge_{cell_type}", nn.Parameter(spec.init_scale * torch.randn(n_edges)))

    def _edge_softmax(self, beta: Tensor) -> Tensor:
        """softmax of beta over the incoming edges of each node (edges are grouped by destination)."""
        return torch.cat([torch.softmax(beta[rows[0] : rows[-1] + 1], dim=0) for rows in self._segments])

    def forward(self) -> ArchitectureWeights:
        weights: dict[str, Tensor] = {}
        for cell_type in self.spec.space.cell_types:
            weights[cell_type] = torch.softmax(getattr(self, cell_type), dim=-1)
            if self.spec.space.edge_normalization:
                weights[f"edge_{cell_type}"] = self._edge_softmax(getattr(self, f"edge_{cell_type}"))
        return ArchitectureWeights(weights, self.spec, self.base_dir, self.edges)


class Supernet(CellNetwork):
    """The network of mixed operations over a search space; ``forward(x, weights)`` with the
    ArchitectureWeights of the architecture variable (``upper["arch"]()``)."""

    def __init__(self, spec: Any):
        space = spec.space
        edges = cell_edges(cell_graph(space.cell.inputs, space.cell.nodes, space.cell.edges))

        def make_edge(cell_type: str, src: int, dst: int, channels: int, stride: int) -> nn.Module:
            return MixedOp(space.kind, space.ops, channels, stride, space.partial_channels,
                           space.mixed_op, space.op_weighting)

        super().__init__(space, {t: edges for t in ("normal", "reduce")}, make_edge, affine=False)
        self.spec = spec

    def forward(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if weights is None:
            raise TypeError("the supernet needs the architecture's mixture weights: net(x, upper['arch']())")
        return super().forward(x, weights)
