"""The network skeleton shared by the supernet and by derived networks: cells on a DAG, stacked.

A cell (DARTS, Liu et al. 2019) preprocesses its inputs (the outputs of the previous two cells)
to C channels, computes each intermediate node in topological order as the sum of its incoming
edges, x_j = sum_{i -> j} o_{i,j}(x_i), and outputs the concatenation of the intermediate nodes.
In the supernet each edge is a mixed operation weighted by the architecture (and each edge by its
edge-normalization weight); in a derived network each kept edge is one operation.

Conv networks: stem conv 3x3 -> cells (reduction cells halve the resolution and double C; edges
from the inputs of a reduction cell have stride 2) -> global average pooling -> linear. MLP
networks: linear stem -> cells -> linear."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from bilevel.nas.ops import FactorizedReduce, ReLUConvBN

__all__ = ["Cell", "CellNetwork", "EdgeFactory"]

EdgeFactory = Callable[[str, int, int, int, int], nn.Module]
"""make_edge(cell_type, source, destination, channels, stride) -> a module called as edge(x, weights)."""


def _preprocess(kind: str, c_in: int, c_out: int, reduce: bool, affine: bool) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.ReLU(), nn.Linear(c_in, c_out))
    if reduce:
        return FactorizedReduce(c_in, c_out, affine)
    return ReLUConvBN(c_in, c_out, 1, 1, 0, affine)


class Cell(nn.Module):
    """One cell on the edges ``edges`` (canonical order; row e of the weights belongs to edge e)."""

    def __init__(
        self,
        kind: str,
        cell_type: str,
        edges: Sequence[tuple[int, int]],
        inputs: int,
        nodes: int,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        make_edge: EdgeFactory,
        affine: bool,
    ):
        super().__init__()
        self.cell_type = cell_type
        self.inputs = inputs
        self.edges = [tuple(e) for e in edges]
        self.intermediate = list(range(inputs, inputs + nodes))
        self.preprocess = nn.ModuleList()
        if inputs == 2:
            self.preprocess.append(_preprocess(kind, c_prev_prev, channels, reduction_prev, affine))
        self.preprocess.append(_preprocess(kind, c_prev, channels, False, affine))
        self.ops = nn.ModuleList(
            make_edge(cell_type, src, dst, channels, 2 if reduction and src < inputs else 1) for src, dst in self.edges
        )
        graph = nx.DiGraph(self.edges)
        graph.add_nodes_from(range(inputs + nodes))
        order = [n for n in nx.topological_sort(graph) if n >= inputs]
        self._incoming = [(node, [e for e, (_, dst) in enumerate(self.edges) if dst == node]) for node in order]
        self.out_channels = nodes * channels

    def forward(self, s0: Tensor, s1: Tensor, op_weights: Tensor | None = None, edge_weights: Tensor | None = None) -> Tensor:
        states: dict[int, Tensor] = {}
        if self.inputs == 2:
            states[0], states[1] = self.preprocess[0](s0), self.preprocess[1](s1)
        else:
            states[0] = self.preprocess[0](s1)
        for node, incoming in self._incoming:
            total = None
            for e in incoming:
                out = self.ops[e](states[self.edges[e][0]], None if op_weights is None else op_weights[e])
                if edge_weights is not None:
                    out = edge_weights[e] * out
                total = out if total is None else total + out
            states[node] = total  # type: ignore[assignment]
        return torch.cat([states[n] for n in self.intermediate], dim=1)


class CellNetwork(nn.Module):
    """Stem, cells and classifier; ``cell_edges[type]`` are the edges of cells of that type.

    ``forward(x, weights)``: ``weights[type]`` (E, O) mixture weights per cell type and, with edge
    normalization, ``weights["edge_" + type]`` (E,); None for a derived network."""

    def __init__(
        self,
        space: Any,
        cell_edges: Mapping[str, Sequence[tuple[int, int]]],
        make_edge: EdgeFactory,
        affine: bool,
        channels: int | None = None,
        cells: int | None = None,
    ):
        super().__init__()
        self.kind = space.kind
        width = channels or (space.channels if space.kind == "conv" else space.width)
        n_cells = cells or space.cells
        reductions = set(space.reduction_cells())
        if cells is not None and cells != space.cells and reductions:
            reductions = {cells // 3, 2 * cells // 3}
        inputs, nodes = space.cell.inputs, space.cell.nodes
        if self.kind == "conv":
            stem_out = space.stem_multiplier * width
            self.stem = nn.Sequential(
                nn.Conv2d(space.in_channels, stem_out, 3, padding=1, bias=False), nn.BatchNorm2d(stem_out, affine=affine)
            )
        else:
            stem_out = width
            self.stem = nn.Sequential(nn.Flatten(), nn.Linear(space.in_features, width))
        c_pp, c_p, c = stem_out, stem_out, width
        self.cells = nn.ModuleList()
        reduction_prev = False
        for index in range(n_cells):
            reduction = index in reductions
            if reduction:
                c *= 2
            cell_type = "reduce" if reduction else "normal"
            cell = Cell(self.kind, cell_type, cell_edges[cell_type], inputs, nodes, c_pp, c_p, c, reduction,
                        reduction_prev, make_edge, affine)
            self.cells.append(cell)
            c_pp, c_p = c_p, cell.out_channels
            reduction_prev = reduction
        self.pool = nn.AdaptiveAvgPool2d(1) if self.kind == "conv" else nn.Identity()
        self.classifier = nn.Linear(c_p, space.classes)

    def forward(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            if weights is None:
                op_w = edge_w = None
            else:
                op_w, edge_w = weights[cell.cell_type], weights.get(f"edge_{cell.cell_type}")
            s0, s1 = s1, cell(s0, s1, op_w, edge_w)
        return self.classifier(self.pool(s1).flatten(1))
