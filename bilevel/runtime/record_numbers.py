"""A metrics record (one line of metrics.jsonl) as named numbers, for the loggers that take
scalars: TensorBoard, MLflow, Weights & Biases.

``record_values`` names each number as TensorBoard shows it: the top-level figures under their
names (upper_loss, hypergrad_norm, inner_residual, engine-specific ones), the tracked upper
variables as ``upper/<name>`` and the monitor's values as ``monitor/<name>``, a vector entry by
entry as ``<name>/<i>``; a vector longer than ``max_entries`` is yielded whole (as a list), for
a logger that can take it as a histogram. The step and non-numeric values are left out.

Apart from ``bilevel.runtime.records`` (which re-exports these names) because that module
imports the progress display and through it bilevel.reporting, whose tables
(bilevel.reporting.table) use these functions: one module would be an import cycle."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from bilevel.plain import flat_numbers

__all__ = ["MAX_SCALARS", "flat_numbers", "flat_params", "record_values", "scalar_values"]

MAX_SCALARS = 16
"""Vectors up to this length are logged entry by entry; longer ones whole (a histogram)."""

_SKIPPED = {"step"}


def _named(tag: str, value: Any, max_entries: int) -> Iterator[tuple[str, float | list[float]]]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield tag, float(value)
        return
    flat = flat_numbers(value)
    if flat is None:
        return
    if len(flat) <= max_entries:
        for index, item in enumerate(flat):
            yield f"{tag}/{index}", item
    else:
        yield tag, flat


def record_values(record: Mapping[str, Any], max_entries: int = MAX_SCALARS) -> Iterator[tuple[str, float | list[float]]]:
    """(name, number) per number of ``record``, or (name, list) for a vector longer than
    ``max_entries`` (module docstring)."""
    for name, value in record.items():
        if name in _SKIPPED:
            continue
        if name in ("upper", "monitor") and isinstance(value, Mapping):
            for key, item in value.items():
                yield from _named(f"{name}/{key}", item, max_entries)
        else:
            yield from _named(name, value, max_entries)


def scalar_values(record: Mapping[str, Any], max_entries: int = MAX_SCALARS) -> dict[str, float]:
    """The numbers of ``record`` by name, vectors longer than ``max_entries`` left out."""
    return {name: value for name, value in record_values(record, max_entries) if isinstance(value, float)}


def flat_params(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a spec's JSON form) as dotted keys -> leaf values; lists are kept whole
    as their JSON text, so that every value is a string, a number, a boolean or None."""
    import json

    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(flat_params(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (list, tuple)):
        out[prefix] = json.dumps(data)
    else:
        out[prefix] = data
    return out
