"""Discrete cells: derived from the architecture weights, or sampled at random from the space.

Derivation (DARTS, Liu et al. 2019, section 2.4): for each intermediate node keep the ``keep``
incoming edges of largest strength max_{o != none} w_{e,o} (times the edge-normalization weight
with PC-DARTS), each with its strongest operation other than ``none``.

Skip limit (P-DARTS, Chen et al. 2019, "Progressive Differentiable Architecture Search", ICCV):
DARTS tends to collapse to parameter-free skip connections. With ``max_skip = M`` the derived
normal cell keeps the M skip connections of largest weight; each other kept edge whose best
operation is a skip takes its best operation other than none and skip_connect instead."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel.nas.search_space import cell_edges, cell_graph, check_skip_limit, incoming

__all__ = [
    "Genotype",
    "architecture_from_json",
    "check_architecture",
    "check_genotype",
    "derive_architecture",
    "derive_genotype",
    "random_architecture",
    "random_genotype",
]

SKIP = "skip_connect"


@dataclass(frozen=True)
class Genotype:
    """A discrete architecture: per cell type, the kept edges as (operation, source, destination)."""

    cells: dict[str, tuple[tuple[str, int, int], ...]]

    def skip_count(self, cell_type: str = "normal") -> int:
        return sum(op == SKIP for op, _, _ in self.cells.get(cell_type, ()))

    def edges(self, cell_type: str) -> list[tuple[int, int]]:
        """The kept edges of a cell type in canonical order (destination, then source)."""
        return sorted(((s, d) for _, s, d in self.cells[cell_type]), key=lambda e: (e[1], e[0]))

    def op(self, cell_type: str, src: int, dst: int) -> str:
        for name, s, d in self.cells[cell_type]:
            if (s, d) == (src, dst):
                return name
        raise KeyError(f"no edge [{src}, {dst}] in the {cell_type} cell")

    def to_json(self) -> dict[str, list[list[Any]]]:
        return {t: [[op, s, d] for op, s, d in edges] for t, edges in self.cells.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Genotype":
        """From {cell type: [[operation, source, destination], ...]}, or an object holding that
        under "genotype" (the genotype files the NAS monitor and report write)."""
        cells = data["genotype"] if "genotype" in data else data
        return cls({t: tuple((str(op), int(s), int(d)) for op, s, d in edges) for t, edges in cells.items()})

    @classmethod
    def load(cls, path: str | Path) -> "Genotype":
        return cls.from_json(json.loads(Path(path).read_text()))


def check_genotype(genotype: Genotype, space: Any) -> tuple[str, str] | None:
    """The first reason ``genotype`` cannot be built in ``space``, as (dotted path under the
    genotype, message), or None. A cell can be built when it has every cell type of the space,
    each operation is one the space's kind implements (any of them: a hand-written cell may use
    operations the search did not), each edge is an edge of the space's cell graph, and its edges
    form a cell (``cell_graph``: no edge twice, every intermediate node reachable from an input)."""
    from bilevel.nas.ops import CONV_OPS, MLP_OPS

    known = CONV_OPS if space.kind == "conv" else MLP_OPS
    cell = space.cell
    allowed = set(cell_graph(cell.inputs, cell.nodes, cell.edges).edges)
    for cell_type in space.cell_types:
        if cell_type not in genotype.cells:
            return "", f"no {cell_type} cell; the search space has {', '.join(space.cell_types)} cells"
    for cell_type, edges in genotype.cells.items():
        if cell_type not in space.cell_types:
            return cell_type, f"the search space has no {cell_type} cells (it has {', '.join(space.cell_types)})"
        for index, (op, src, dst) in enumerate(edges):
            where = f"{cell_type}.{index}"
            if op not in known:
                return where, f"unknown operation {op!r}; {space.kind} cells take {', '.join(known)}"
            if (src, dst) not in allowed:
                return where, f"[{src}, {dst}] is not an edge of the search space's cell (edges: {sorted(allowed, key=lambda e: (e[1], e[0]))})"
        try:
            cell_graph(cell.inputs, cell.nodes, [(src, dst) for _, src, dst in edges])
        except ValueError as exc:
            return cell_type, str(exc)
    return None


def _strongest(row: Tensor, names: list[str], excluded: set[str]) -> tuple[int, float] | None:
    best: tuple[int, float] | None = None
    for index, name in enumerate(names):
        if name in excluded:
            continue
        value = float(row[index])
        if best is None or value > best[1]:
            best = (index, value)
    return best


def derive_genotype(weights: Mapping[str, Tensor], space: Any, max_skip: int | None | str = "space") -> Genotype:
    """The discrete cell of each cell type from mixture weights (``upper["arch"]()``).

    ``max_skip``: "space" uses the space's limit; an int overrides it (ValueError when the space's
    operations cannot meet it); None derives without one."""
    limit = space.max_skip if max_skip == "space" else max_skip
    check_skip_limit(space.ops, space.cell.keep, space.cell.nodes, limit)
    graph = cell_graph(space.cell.inputs, space.cell.nodes, space.cell.edges)
    edges = cell_edges(graph)
    names = list(space.ops)
    cells: dict[str, tuple[tuple[str, int, int], ...]] = {}
    for cell_type in space.cell_types:
        w = weights[cell_type].detach().double().cpu()
        edge_w = weights.get(f"edge_{cell_type}")
        edge_w = torch.ones(len(edges), dtype=torch.float64) if edge_w is None else edge_w.detach().double().cpu()
        kept: list[tuple[int, str]] = []  # (edge index, op)
        for node, rows in sorted(incoming(graph).items()):
            scored = []
            for e in rows:
                best = _strongest(w[e], names, {"none"})
                assert best is not None  # the spec requires an operation other than none
                scored.append((best[1] * float(edge_w[e]), -e, e, names[best[0]]))
            scored.sort(reverse=True)
            kept += [(e, op) for _, _, e, op in scored[: space.cell.keep]]
        if limit is not None and cell_type == "normal":
            kept = _limit_skips(kept, w, edge_w, names, limit)
        cells[cell_type] = tuple((op, edges[e][0], edges[e][1]) for e, op in sorted(kept, key=lambda k: (edges[k[0]][1], edges[k[0]][0])))
    return Genotype(cells)


def _limit_skips(kept: list[tuple[int, str]], w: Tensor, edge_w: Tensor, names: list[str], limit: int) -> list[tuple[int, str]]:
    skips = [e for e, op in kept if op == SKIP]
    if len(skips) <= limit or SKIP not in names:
        return kept
    skip_index = names.index(SKIP)
    ranked = sorted(skips, key=lambda e: (-float(w[e, skip_index] * edge_w[e]), e))
    demoted = set(ranked[limit:])
    out = []
    for e, op in kept:
        if e in demoted:
            best = _strongest(w[e], names, {"none", SKIP})
            assert best is not None  # check_skip_limit: ops has an operation other than none and skip_connect
            op = names[best[0]]
        out.append((e, op))
    return out


def random_genotype(space: Any, generator: torch.Generator, max_skip: int | None | str = "space") -> Genotype:
    """A cell drawn uniformly from the derived cells of the space: for each node, ``keep`` distinct
    incoming edges and an operation other than none for each; redrawn while the normal cell has more
    skip connections than the limit (uniform over the cells the derivation can produce). ValueError
    when the space's operations cannot meet the limit."""
    limit = space.max_skip if max_skip == "space" else max_skip
    check_skip_limit(space.ops, space.cell.keep, space.cell.nodes, limit)
    graph = cell_graph(space.cell.inputs, space.cell.nodes, space.cell.edges)
    edges = cell_edges(graph)
    names = [n for n in space.ops if n != "none"]
    for _ in range(10_000):
        cells: dict[str, tuple[tuple[str, int, int], ...]] = {}
        for cell_type in space.cell_types:
            chosen: list[tuple[str, int, int]] = []
            for _, rows in sorted(incoming(graph).items()):
                order = torch.randperm(len(rows), generator=generator)[: space.cell.keep].tolist()
                for k in sorted(order):
                    op = names[int(torch.randint(len(names), (1,), generator=generator))]
                    chosen.append((op, *edges[rows[k]]))
            cells[cell_type] = tuple(sorted(chosen, key=lambda c: (c[2], c[1])))
        genotype = Genotype(cells)
        if limit is None or genotype.skip_count("normal") <= limit:
            return genotype
    raise ValueError(f"no random cell satisfies max_skip = {limit}")


# --- any search space: cells (this module) or macro spaces (bilevel.nas.macro) --------------------
def derive_architecture(weights: Mapping[str, Tensor], space: Any) -> Any:
    """The discrete architecture of ``space`` from its mixture weights: a Genotype (cell spaces,
    ``derive_genotype`` with the space's skip limit) or a MacroGenotype."""
    if space.kind == "macro":
        from bilevel.nas.macro import derive_macro_genotype

        return derive_macro_genotype(weights, space)
    return derive_genotype(weights, space)


def random_architecture(space: Any, generator: torch.Generator) -> Any:
    """An architecture drawn uniformly from the space (``random_genotype`` for cells)."""
    if space.kind == "macro":
        from bilevel.nas.macro import random_macro_genotype

        return random_macro_genotype(space, generator)
    return random_genotype(space, generator)


def architecture_from_json(data: Mapping[str, Any], space: Any) -> Any:
    """A genotype file's architecture, read as the space's kind of genotype."""
    if space.kind == "macro":
        from bilevel.nas.macro import MacroGenotype

        return MacroGenotype.from_json(data)
    return Genotype.from_json(data)


def check_architecture(genotype: Any, space: Any) -> tuple[str, str] | None:
    """``check_genotype`` for cells, ``check_macro_genotype`` for macro spaces."""
    if space.kind == "macro":
        from bilevel.nas.macro import check_macro_genotype

        return check_macro_genotype(genotype, space)
    return check_genotype(genotype, space)
