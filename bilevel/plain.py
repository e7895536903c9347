"""Values as plain Python data for JSON (tensors as nested lists, mappings with string keys), and
nested lists of numbers flattened (for logging and plotting recorded values)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["flat_numbers", "plain"]


def plain(value: Any) -> Any:
    """``value`` with every tensor replaced by its nested list (on the host), mappings by dicts
    with string keys and tuples by lists; other values (numbers, strings, None) as they are."""
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flat_numbers(value: Any) -> list[float] | None:
    """A number or a (nested) list of numbers as one flat list of floats; None when it holds
    anything else (a string, a bool, None, a mapping)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        out: list[float] = []
        for item in value:
            inner = flat_numbers(item)
            if inner is None:
                return None
            out += inner
        return out
    return None
