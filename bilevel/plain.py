"""Values as plain Python data for JSON: tensors as (nested) lists, mappings with string keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["plain"]


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
