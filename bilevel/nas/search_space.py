"""Cells as networkx DAGs: node numbering, the default dense cell, and validation.

A cell (Liu et al. 2019, "DARTS: Differentiable Architecture Search", ICLR) is a directed acyclic
graph. Its first ``inputs`` nodes are inputs (the outputs of the previous one or two cells); the
next ``nodes`` nodes are intermediate nodes, each the sum of its incoming edges; the cell's output
is the concatenation of all intermediate nodes. Every edge carries a mixed operation, so the
architecture has one row of mixture weights per edge. Edges are kept in one canonical order,
sorted by (destination, source): row e of an architecture tensor belongs to ``edges[e]``.

This module needs only networkx: the spec validates cells with it before anything is built."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

__all__ = ["cell_edges", "cell_graph", "check_keep", "check_skip_limit", "dense_edges", "incoming", "intermediate_nodes"]


def dense_edges(inputs: int, nodes: int) -> list[tuple[int, int]]:
    """The DARTS cell: every input and every earlier intermediate node feeds each intermediate node
    (2 inputs, 4 nodes: 14 edges)."""
    return [(src, dst) for dst in range(inputs, inputs + nodes) for src in range(dst)]


def intermediate_nodes(inputs: int, nodes: int) -> list[int]:
    return list(range(inputs, inputs + nodes))


def _describe_nodes(inputs: int, nodes: int) -> str:
    last_input, last = inputs - 1, inputs + nodes - 1
    ins = "input 0" if inputs == 1 else f"inputs 0-{last_input}"
    mids = f"intermediate {inputs}" if nodes == 1 else f"intermediate {inputs}-{last}"
    return f"nodes are 0..{last} ({ins}, {mids})"


def cell_graph(inputs: int, nodes: int, edges: Sequence[Sequence[int]] | None = None) -> nx.DiGraph:
    """The cell as a DiGraph with edges in canonical order, or ValueError saying what is wrong.

    Checked: every edge names two declared nodes, no edge ends at an input, no edge repeats, the
    graph is acyclic, and every intermediate node is reachable from an input (a node without such
    a path would be disconnected from the data)."""
    pairs = dense_edges(inputs, nodes) if edges is None else [tuple(e) for e in edges]
    total = inputs + nodes
    seen: dict[tuple[int, int], int] = {}
    for index, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"edge {index} is {list(pair)}; an edge is a pair [source, destination]")
        src, dst = pair
        for node in (src, dst):
            if not 0 <= node < total:
                raise ValueError(f"edge {index} = [{src}, {dst}] names node {node}; {_describe_nodes(inputs, nodes)}")
        if dst < inputs:
            raise ValueError(f"edge {index} = [{src}, {dst}] ends at input node {dst}; inputs have no incoming edges")
        if (src, dst) in seen:
            raise ValueError(f"edge {index} = [{src}, {dst}] is declared twice (first as edge {seen[src, dst]})")
        seen[src, dst] = index
    graph = nx.DiGraph()
    graph.add_nodes_from(range(total))
    graph.add_edges_from(pairs)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle is not None:
        path = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
        raise ValueError(f"the cell graph has a cycle ({path}); a cell must be a directed acyclic graph")
    reachable: set[int] = set()
    for node in range(inputs):
        reachable |= nx.descendants(graph, node) | {node}
    orphans = [n for n in intermediate_nodes(inputs, nodes) if n not in reachable]
    if orphans:
        which = ", ".join(str(n) for n in orphans)
        raise ValueError(
            f"intermediate node{'s' if len(orphans) > 1 else ''} {which} cannot be reached from the inputs"
            f" (no path from node{'s' if inputs > 1 else ''} {', '.join(map(str, range(inputs)))}):"
            " every node needs a path from an input"
        )
    return graph


def cell_edges(graph: nx.DiGraph) -> list[tuple[int, int]]:
    """The edges in canonical order, sorted by (destination, source): row e of an architecture
    tensor belongs to edge e."""
    return sorted(graph.edges, key=lambda e: (e[1], e[0]))


def incoming(graph: nx.DiGraph) -> dict[int, list[int]]:
    """Intermediate node -> the indices (rows of the architecture) of its incoming edges."""
    out: dict[int, list[int]] = {}
    for index, (_, dst) in enumerate(cell_edges(graph)):
        out.setdefault(dst, []).append(index)
    return out


def check_keep(graph: nx.DiGraph, keep: int) -> None:
    """ValueError unless every intermediate node has at least ``keep`` incoming edges: a derived
    cell keeps exactly ``keep`` of them per node (DARTS: 2), so a node with fewer could not be
    derived as declared. (With one input and the dense cell, the first intermediate node has a
    single incoming edge: keep 1, or declare edges.)"""
    for node, rows in sorted(incoming(graph).items()):
        if len(rows) < keep:
            sources = ", ".join(str(src) for src, _ in sorted(graph.in_edges(node)))
            raise ValueError(
                f"keep is {keep}, but intermediate node {node} has only {len(rows)} incoming"
                f" edge{'s' if len(rows) > 1 else ''} (from {sources}); every intermediate node needs at least"
                f" keep incoming edges: lower keep to {len(rows)} or add edges into node {node}"
            )


def check_skip_limit(ops: Sequence[str], keep: int, nodes: int, limit: int | None) -> None:
    """ValueError when no derived normal cell can have at most ``limit`` skip connections.

    The derived normal cell keeps keep x nodes edges, each with an operation other than none; an
    extra skip is replaced by its edge's best operation other than none and skip_connect
    (``bilevel.nas.genotype``). That needs one such operation among ``ops``: without one, every
    kept edge is a skip connection, and a limit below keep x nodes cannot be met."""
    kept = keep * nodes
    if limit is None or limit >= kept or "skip_connect" not in ops:
        return
    if not [op for op in ops if op not in ("none", "skip_connect")]:
        raise ValueError(
            f"max_skip {limit} cannot be met: ops has no operation other than none and skip_connect, so all"
            f" {kept} edges the derived normal cell keeps (keep {keep} x {nodes} nodes) are skip connections;"
            f" add another operation to ops or raise max_skip to {kept}"
        )
