"""Engines that solve chains of more than two levels, by the same ``kind`` as their two-level
counterparts: ``engine: {kind: implicit}`` on a three-level spec builds the nested implicit engine."""

from __future__ import annotations

from typing import Any

from bilevel.engines.base import Capabilities

__all__ = ["build_chain_engine", "chain_engine_capabilities", "chain_engine_class", "chain_engine_kinds", "register_chain_engine"]

_CHAIN_ENGINES: dict[str, type] = {}


def register_chain_engine(cls: type) -> type:
    """Class decorator: make a multilevel engine available by its ``kind``."""
    for attribute in ("kind", "Config", "capabilities", "init", "hypergrad", "solve_below", "unsupported"):
        if not hasattr(cls, attribute):
            raise TypeError(f"multilevel engine {cls.__name__} does not declare {attribute!r}")
    if not isinstance(cls.capabilities, Capabilities):
        raise TypeError(f"multilevel engine {cls.__name__}.capabilities must be a Capabilities")
    _CHAIN_ENGINES[cls.kind] = cls
    return cls


def chain_engine_kinds() -> list[str]:
    return sorted(_CHAIN_ENGINES)


def chain_engine_capabilities() -> dict[str, Capabilities]:
    return {kind: cls.capabilities for kind, cls in sorted(_CHAIN_ENGINES.items())}


def chain_engine_class(kind: str) -> type:
    try:
        return _CHAIN_ENGINES[kind]
    except KeyError:
        raise KeyError(f"no multilevel engine of kind {kind!r}; available: {', '.join(chain_engine_kinds())}") from None


def build_chain_engine(config: Any) -> Any:
    """The multilevel engine for a config (whose ``kind`` selects the class)."""
    return chain_engine_class(config.kind)(config)
