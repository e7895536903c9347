"""Figures of a search: the derived cells (networkx drawing) or the layers of a macro architecture,
and the history of the softmaxed architecture weights (from the monitor's records in metrics.jsonl). Written with matplotlib's
Agg canvas, so no display and no global backend change are needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bilevel.nas.genotype import Genotype

__all__ = ["cell_drawing_graph", "draw_architecture", "draw_genotype", "draw_macro_genotype", "node_label", "plot_alpha_history"]


def _input_label(index: int, inputs: int) -> str:
    return f"{index}: " + ("c_{k-1}" if index == inputs - 1 else "c_{k-2}")


def node_label(index: int, inputs: int) -> str:
    """The drawing's label of cell node ``index``, numbered as the genotype numbers it (its
    edges are [operation, source, destination] over these indices): the inputs ``0: c_{k-2}``,
    ``1: c_{k-1}``, then the intermediate nodes ``2``, ``3``, ..."""
    return _input_label(index, inputs) if index < inputs else str(index)


def cell_drawing_graph(genotype: Genotype, space: Any, cell_type: str) -> nx.DiGraph:
    """The derived cell as a labelled DiGraph, its nodes numbered as in the genotype
    (``node_label``): inputs ``0: c_{k-2}``, ``1: c_{k-1}``, intermediate nodes ``inputs`` ..
    ``inputs + nodes - 1``, the output ``c_{k}``; edges carry their operation in the ``op``
    attribute (the output's incoming edges: ``concat``), so that ``sep_conv_3x3 0->2`` in the
    genotype is the edge from ``0: c_{k-2}`` to ``2``. Node attribute ``layer``: depth from the
    inputs (for layout)."""
    inputs, nodes = space.cell.inputs, space.cell.nodes
    label = {i: node_label(i, inputs) for i in range(inputs + nodes)}
    graph = nx.DiGraph()
    for i in range(inputs + nodes):
        graph.add_node(label[i])
    for op, src, dst in genotype.cells[cell_type]:
        graph.add_edge(label[src], label[dst], op=op)
    depth = {label[i]: 0 for i in range(inputs)}
    for name in nx.topological_sort(graph):
        if name not in depth:
            depth[name] = 1 + max((depth[p] for p in graph.predecessors(name)), default=0)
    graph.add_node("c_{k}")
    for j in range(nodes):
        graph.add_edge(label[inputs + j], "c_{k}", op="concat")
    depth["c_{k}"] = 1 + max(depth.values())
    nx.set_node_attributes(graph, depth, "layer")
    return graph


def _positions(graph: nx.DiGraph, space: Any) -> dict[str, tuple[float, float]]:
    """Inputs on the left, intermediate nodes left to right in order, zig-zagging up and down so
    that edges between neighbours and their labels do not overlap, the output on the right."""
    inputs, nodes = space.cell.inputs, space.cell.nodes
    pos: dict[str, tuple[float, float]] = {}
    for i in range(inputs):
        pos[_input_label(i, inputs)] = (0.0, 1.0 - 2.0 * i if inputs == 2 else 0.0)
    for j in range(nodes):
        pos[node_label(inputs + j, inputs)] = (1.0 + j, 0.55 if j % 2 == 0 else -0.55)
    pos["c_{k}"] = (nodes + 1.0, 0.0)
    return pos


def draw_genotype(genotype: Genotype, space: Any, path: str | Path, title: str | None = None) -> Path:
    """One panel per cell type; edges labelled with their operation. Returns the PNG's path."""
    path = Path(path)
    types = [t for t in ("normal", "reduce") if t in genotype.cells]
    figure = Figure(figsize=(7.5 * len(types), 4.5))
    FigureCanvasAgg(figure)
    for index, cell_type in enumerate(types):
        ax = figure.add_subplot(1, len(types), index + 1)
        graph = cell_drawing_graph(genotype, space, cell_type)
        pos = _positions(graph, space)
        colors = ["#d9e8f5" if "c_" in n else "#fde5c8" for n in graph.nodes]
        nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colors, node_size=1100, edgecolors="#444444")
        shown = {n: n.replace(": ", "\n") for n in graph.nodes}  # "0\nc_{k-2}": the index above the name
        nx.draw_networkx_labels(graph, pos, labels=shown, ax=ax, font_size=8)
        ops = [(u, v) for u, v, d in graph.edges(data=True) if d["op"] != "concat"]
        concat = [(u, v) for u, v, d in graph.edges(data=True) if d["op"] == "concat"]
        nx.draw_networkx_edges(graph, pos, edgelist=ops, ax=ax, arrows=True, node_size=1100, connectionstyle="arc3,rad=0.1")
        nx.draw_networkx_edges(graph, pos, edgelist=concat, ax=ax, arrows=True, style="dashed", edge_color="#999999", node_size=1100)
        labels = {(u, v): d["op"] for u, v, d in graph.edges(data=True) if d["op"] != "concat"}
        nx.draw_networkx_edge_labels(graph, pos, edge_labels=labels, ax=ax, font_size=7, connectionstyle="arc3,rad=0.1")
        skips = genotype.skip_count(cell_type)
        ax.set_title(f"{cell_type} cell ({skips} skip connection{'s' if skips != 1 else ''});"
                     " nodes numbered as in the genotype", fontsize=10)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def draw_macro_genotype(genotype: Any, space: Any, path: str | Path, title: str | None = None) -> Path:
    """A macro architecture as a row of layer boxes (kernel size, width; pooling marked)."""
    path = Path(path)
    layers = genotype.layers
    figure = Figure(figsize=(1.8 * len(layers) + 2.0, 2.4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    for index, (kernel, width) in enumerate(layers):
        pooled = "\n+ max pool 2x2" if index in space.pool_after else ""
        ax.text(index, 0, f"layer {index}\n{kernel}x{kernel} conv\n{width} channels{pooled}", ha="center", va="center",
                fontsize=8, bbox={"boxstyle": "round", "facecolor": "#fde5c8", "edgecolor": "#444444"})
        if index:
            ax.annotate("", xy=(index - 0.38, 0), xytext=(index - 0.62, 0), arrowprops={"arrowstyle": "->"})
    ax.set_xlim(-0.7, len(layers) - 0.3)
    ax.set_ylim(-1, 1)
    ax.axis("off")
    ax.set_title(title or f"macro architecture ({len(layers)} layers, then global pooling and a linear classifier)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def draw_architecture(genotype: Any, space: Any, path: str | Path, title: str | None = None) -> Path:
    """``draw_genotype`` for cell spaces, ``draw_macro_genotype`` for macro spaces."""
    if space.kind == "macro":
        return draw_macro_genotype(genotype, space, path, title)
    return draw_genotype(genotype, space, path, title)


def _alpha_panels(space: Any) -> dict[str, tuple[str, list[str]]]:
    """Monitor key suffix -> (panel title, labels of the row's entries)."""
    if space.kind == "macro":
        return {"kernel": ("kernel size (mean over layers)", [f"{k}x{k}" for k in space.kernels]),
                "width": ("width (mean over layers)", [str(w) for w in space.widths])}
    return {t: (f"{t} cell", list(space.ops)) for t in space.cell_types}


def plot_alpha_history(metrics: str | Path, space: Any, path: str | Path) -> Path | None:
    """The mean over edges (layers, for a macro space) of each candidate's softmaxed weight
    against the step, one panel per cell type (kernel sizes and widths), from the ``alpha_<type>``
    values the NAS monitor logs. None when nothing was logged."""
    panels = _alpha_panels(space)
    records = []
    for line in Path(metrics).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if any(f"alpha_{key}" in record.get("monitor", {}) for key in panels):
            records.append(record)
    if not records:
        return None
    path = Path(path)
    types = [t for t in panels if f"alpha_{t}" in records[0]["monitor"]]
    figure = Figure(figsize=(6 * len(types), 4))
    FigureCanvasAgg(figure)
    steps = [r["step"] for r in records]
    for index, cell_type in enumerate(types):
        ax = figure.add_subplot(1, len(types), index + 1)
        title, labels = panels[cell_type]
        for o, name in enumerate(labels):
            means = []
            for record in records:
                rows = record["monitor"][f"alpha_{cell_type}"]
                means.append(sum(row[o] for row in rows) / len(rows))
            ax.plot(steps, means, label=name, linestyle="--" if name in ("none", "skip_connect") else "-")
        ax.axhline(1.0 / len(labels), color="#bbbbbb", linewidth=0.8)
        ax.set_xlabel("outer step")
        ax.set_ylabel("softmax weight (mean over " + ("layers)" if space.kind == "macro" else "edges)"))
        ax.set_title(title)
        ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
