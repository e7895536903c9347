"""The registry of engines by kind: the one list the planner, the spec's engine union, the CLI
(``bilevel engines``), the JSON schema and the conformance suite read.

An engine registers with the :func:`register` decorator when its module is imported: the
built-in ones when ``bilevel.engines`` is, others from a spec's ``plugins`` (a file or module
imported before the spec is validated) or from an installed package's entry point in the group
``bilevel.engines`` (loaded with the built-ins). See docs/howto/new-engine.md."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from bilevel.engines.capabilities import Capabilities
from bilevel.engines.state import EngineState
from bilevel.fastpath.accelerated import accelerated
from bilevel.spec.engine import AutoEngine, EngineConfig
from bilevel.spec.problem import use_engine_configs

__all__ = [
    "ENTRY_POINT_GROUP",
    "build_engine",
    "engine_capabilities",
    "engine_class",
    "engine_config",
    "engine_kinds",
    "engines_by_priority",
    "load_entry_points",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "bilevel.engines"
_ENGINES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make an engine available by its ``kind`` (its Config then validates in
    specs, the planner considers it by its capabilities and priority)."""
    for attribute in ("kind", "Config", "State", "capabilities", "priority", "init", "hypergrad", "lower_solution",
                      "post_step", "configure", "explain", "refusals", "execution_report"):
        if not hasattr(cls, attribute):
            raise TypeError(f"engine {cls.__name__} does not declare {attribute!r} (derive it from bilevel.engines.EngineBase)")
    if not isinstance(cls.capabilities, Capabilities):
        raise TypeError(f"engine {cls.__name__}.capabilities must be a Capabilities")
    if not (isinstance(cls.State, type) and issubclass(cls.State, EngineState)):
        raise TypeError(f"engine {cls.__name__}.State must be a subclass of bilevel.engines.EngineState")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, EngineConfig)):
        raise TypeError(f"engine {cls.__name__}.Config must be a subclass of bilevel.spec.engine.EngineConfig")
    if cls.Config.model_fields["kind"].default != cls.kind:
        raise TypeError(f"engine {cls.__name__}: its Config's kind defaults to {cls.Config.model_fields['kind'].default!r},"
                        f" not {cls.kind!r} (declare kind: Literal[{cls.kind!r}] = {cls.kind!r})")
    if cls.kind == "auto":
        raise TypeError("'auto' is the planner's choice, not an engine kind")
    clash = [kind for kind, other in _ENGINES.items() if other.priority == cls.priority and kind != cls.kind]
    if clash:
        raise TypeError(f"engine {cls.kind!r} declares priority {cls.priority}, as {clash[0]!r} does: priorities order the"
                        " engines a planner rule admits and must differ (taken: "
                        + ", ".join(f"{k} {c.priority}" for k, c in sorted(_ENGINES.items())) + ")")
    _ENGINES[cls.kind] = cls
    use_engine_configs([c.Config for c in engines_by_priority()])
    return cls


def unregister(kind: str) -> None:
    """Remove an engine (tests that register temporary ones)."""
    _ENGINES.pop(kind, None)
    use_engine_configs([c.Config for c in engines_by_priority()])


def engine_kinds() -> list[str]:
    return sorted(_ENGINES)


def engine_capabilities() -> dict[str, Capabilities]:
    return {kind: cls.capabilities for kind, cls in sorted(_ENGINES.items())}


def engines_by_priority() -> list[type]:
    """The registered engine classes, highest priority first."""
    return sorted(_ENGINES.values(), key=lambda cls: -cls.priority)


def engine_class(kind: str) -> type:
    try:
        return _ENGINES[kind]
    except KeyError:
        raise KeyError(f"no engine of kind {kind!r}; available: {', '.join(engine_kinds())}") from None


def engine_config(engine: Any) -> Any:
    """An engine config from a kind's name (its defaults; "auto" for the planner), a mapping
    ({"kind": ..., options}), or a config (returned as it is)."""
    if isinstance(engine, EngineConfig):
        return engine
    if isinstance(engine, str):
        engine = {"kind": engine}
    if not isinstance(engine, dict) or not isinstance(engine.get("kind"), str):
        raise TypeError(f"expected an engine name, a mapping with a 'kind' or an engine config; got {type(engine).__name__}")
    options = {k: v for k, v in engine.items() if k != "kind"}
    if engine["kind"] == "auto":
        return AutoEngine(**options)
    return engine_class(engine["kind"]).Config(**options)


def build_engine(config: Any) -> Any:
    """The engine for a config (whose ``kind`` selects the class); engines whose config has a
    ``fast_path`` run through the fast path (``bilevel.fastpath``), any other plainly."""
    engine = engine_class(config.kind)(config)
    if hasattr(config, "fast_path"):
        return accelerated(engine)
    return engine


def load_entry_points() -> list[str]:
    """Import the engines installed packages declare in the entry-point group ``bilevel.engines``;
    returns their names."""
    loaded = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        point.load()
        loaded.append(point.name)
    return loaded
