"""The tree of levels: its order, parents, ancestors, children and subtrees.

Levels name their parent; the tree has one top level. ``chain`` lists the levels in preorder (the
top first, each level before its descendants, children in declaration order), and every index
below is an index into ``chain`` (docs/howto/trees-and-blocks.md)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import networkx as nx

if TYPE_CHECKING:
    from bilevel.problem.level import Level

__all__ = ["LevelTree"]


class LevelTree:
    """The topology of ``levels`` (a mapping name -> Level whose ``parent`` fields make the tree);
    mixed into :class:`~bilevel.problem.problem.Problem`."""

    levels: dict[str, Level]

    @functools.cached_property
    def graph(self) -> nx.DiGraph:
        """Edges parent -> child."""
        graph = nx.DiGraph()
        graph.add_nodes_from(self.levels)
        graph.add_edges_from((level.parent, name) for name, level in self.levels.items() if level.parent is not None)
        return graph

    @functools.cached_property
    def chain(self) -> tuple[Level, ...]:
        """The levels in preorder: the top first, each level before its descendants, children in
        declaration order (for a chain, from the top down)."""
        (top,) = (name for name, level in self.levels.items() if level.parent is None)
        order: list[str] = []

        def visit(name: str) -> None:
            order.append(name)
            for child, level in self.levels.items():
                if level.parent == name:
                    visit(child)

        visit(top)
        return tuple(self.levels[name] for name in order)

    @functools.cached_property
    def parents(self) -> tuple[int | None, ...]:
        """The index of each level's parent in ``chain`` (None for the top)."""
        index = {level.name: k for k, level in enumerate(self.chain)}
        return tuple(None if level.parent is None else index[level.parent] for level in self.chain)

    @functools.cached_property
    def _relatives(self) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
        """(ancestors, children, subtree) of every level, computed once (objectives ask at every step)."""
        n = len(self.parents)
        children = tuple(tuple(j for j, parent in enumerate(self.parents) if parent == k) for k in range(n))
        ancestors = []
        for k in range(n):
            out: list[int] = []
            parent = self.parents[k]
            while parent is not None:
                out.insert(0, parent)
                parent = self.parents[parent]
            ancestors.append(tuple(out))
        subtrees: list[tuple[int, ...]] = [()] * n
        for k in reversed(range(n)):  # preorder: descendants come after their ancestor
            subtrees[k] = (k, *(j for child in children[k] for j in subtrees[child]))
        return tuple(ancestors), children, tuple(subtrees)

    def ancestors(self, k: int) -> tuple[int, ...]:
        """The indices of level k's ancestors, the top first."""
        return self._relatives[0][k]

    def children(self, k: int) -> tuple[int, ...]:
        return self._relatives[1][k]

    def subtree(self, k: int) -> tuple[int, ...]:
        """Level k and its descendants, in preorder."""
        return self._relatives[2][k]

    @property
    def is_chain(self) -> bool:
        """Every level has at most one child."""
        return all(len(self.children(k)) <= 1 for k in range(len(self.chain)))

    @property
    def shape(self) -> str:
        """The levels as text: "top -> middle -> bottom" for a chain, "top -> (a, b -> c)" for a tree."""
        def text(k: int) -> str:
            below = self.children(k)
            if not below:
                return self.chain[k].name
            inner = text(below[0]) if len(below) == 1 else "(" + ", ".join(text(c) for c in below) + ")"
            return f"{self.chain[k].name} -> {inner}"

        return text(0)

    @property
    def depth(self) -> int:
        """The number of levels (2: a bilevel problem)."""
        return len(self.chain)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.chain)

