"""Registry of engines by kind. Engines register at import; the planner and CLI read from here."""

from __future__ import annotations

from typing import Any

from bilevel.engines.base import Capabilities

__all__ = ["build_engine", "engine_capabilities", "engine_kinds", "register"]

_ENGINES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make an engine available by its ``kind``."""
    for attribute in ("kind", "Config", "capabilities", "init", "hypergrad"):
        if not hasattr(cls, attribute):
            raise TypeError(f"engine {cls.__name__} does not declare {attribute!r}")
    if not isinstance(cls.capabilities, Capabilities):
        raise TypeError(f"engine {cls.__name__}.capabilities must be a Capabilities")
    _ENGINES[cls.kind] = cls
    return cls


def engine_kinds() -> list[str]:
    return sorted(_ENGINES)


def engine_capabilities() -> dict[str, Capabilities]:
    return {kind: cls.capabilities for kind, cls in sorted(_ENGINES.items())}


def build_engine(config: Any) -> Any:
    """The engine for a config (whose ``kind`` selects the class)."""
    try:
        cls = _ENGINES[config.kind]
    except KeyError:
        raise KeyError(f"no engine of kind {config.kind!r}; available: {', '.join(engine_kinds())}") from None
    return cls(config)
