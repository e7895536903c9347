"""The per-copy arguments of a stacked objective, as its evaluation takes them.

A stacked objective's arguments (the levels' variables, the batch, the varying objective
arguments) are nested tuples and dicts of tensors with vmap's ``in_dims`` beside them: 0 where
the leading dimension indexes the copies (instances, tasks), None where the value is shared.
``unbound`` splits them into one argument tuple per copy (the loop over copies that replaces
vmap on CPU, ``bilevel.problem.stack.vectorization``); ``restrict_rows`` keeps the copies i in
[start, stop) only (a data-parallel rank's tasks, ``bilevel.problem.tasks``), a slice whose
backward scatters into the full tensors, zero outside the rows."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["restrict_rows", "unbound"]


def unbound(count: int, args: tuple[Any, ...], in_dims: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The per-instance arguments, as vmap would present them: ``torch.unbind`` along the
    leading dimension where in_dims says 0 (its backward is one stack, not N scatters)."""

    def split(value: Any, dim: Any) -> list[Any]:
        if value is None:
            return [None] * count
        if isinstance(dim, dict):
            parts = {key: split(value[key], dim.get(key)) for key in value}
            return [{key: parts[key][k] for key in value} for k in range(count)]
        if isinstance(value, dict):
            parts = {key: split(item, dim) for key, item in value.items()}
            return [{key: parts[key][k] for key in value} for k in range(count)]
        if isinstance(value, tuple):
            dims = dim if isinstance(dim, tuple) else (dim,) * len(value)
            parts = [split(item, d) for item, d in zip(value, dims)]
            return [tuple(part[k] for part in parts) for k in range(count)]
        if dim is None:
            return [value] * count
        return list(torch.unbind(value, dim))

    columns = [split(arg, dim) for arg, dim in zip(args, in_dims)]
    return [tuple(column[k] for column in columns) for k in range(count)]


def restrict_rows(value: Any, dim: Any, rows: slice) -> Any:
    """``value`` restricted to ``rows`` along the leading dimension wherever ``dim`` (nested as
    vmap's in_dims) says 0; what enters unbatched is left whole."""
    if value is None or dim is None:
        return value
    if isinstance(value, dict):
        return {key: restrict_rows(item, dim.get(key) if isinstance(dim, dict) else dim, rows) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(restrict_rows(item, d, rows) for item, d in zip(value, dim if isinstance(dim, tuple) else (dim,) * len(value)))
    return value[rows]
