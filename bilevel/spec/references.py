"""Every reference to user code a spec holds, with its dotted path, read from the raw data before
anything is imported (``bilevel validate`` lists them first; see the trust model in
``bilevel.refs``). Keyword-argument mappings (``*kwargs``) are the user's own values and are not
searched."""

from __future__ import annotations

import re
from typing import Any

from bilevel.spec._base import REFERENCE_PATTERN

__all__ = ["spec_references"]

_CALLABLE_KEYS = frozenset({"objective", "factory", "source", "init", "solution", "fn", "report", "monitor", "data",
                            "sampler", "test_sampler", "metrics"})
_PATTERN = re.compile(REFERENCE_PATTERN)


def spec_references(data: Any, path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(dotted path, reference) for every callable reference and plugin module in spec data."""
    found: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            key = str(key)
            if key.endswith("kwargs"):
                continue
            if key == "plugins" and not path and isinstance(value, list):
                found += [(f"plugins.{i}", item) for i, item in enumerate(value) if isinstance(item, str)]
            elif key in _CALLABLE_KEYS and isinstance(value, str) and _PATTERN.match(value):
                found.append((".".join((*path, key)), value))
            else:
                found += spec_references(value, (*path, key))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found += spec_references(item, (*path, str(index)))
    return found
