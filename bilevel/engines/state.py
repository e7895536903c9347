"""What an engine carries between calls, as a typed dataclass per engine.

Every state holds the warm-started lower solution, the inner optimizer's state and the number of
calls so far; an engine that carries more declares a subclass with its own fields (tuples of
tensors, or None where absent), e.g. ``ImplicitState.v``, the previous linear-system solution.
The fields are what a checkpoint stores (``state_dict``) and what the fast path feeds a captured
graph (``tensors``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from bilevel.problem import Params

__all__ = ["EngineState"]

S = TypeVar("S", bound="EngineState")


@dataclass
class EngineState:
    """The state every engine carries (subclasses add fields with defaults)."""

    lower: Params
    """The lower solution (for more than two levels: every level below the top, flattened)."""
    inner_state: Params = ()
    """The inner optimizer's state (momentum buffers, Adam moments) carried across warm starts."""
    step: int = 0
    """Calls so far (schedules of single-loop engines read it)."""

    def tensors(self) -> dict[str, Any]:
        """Every field but the step counter: the tensors a captured call takes and returns."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "step"}

    def rebuilt(self: S, tensors: dict[str, Any], step: int) -> S:
        """A state of the same type from ``tensors()``-shaped values and a step count."""
        return type(self)(**{name: _as_params(value) for name, value in tensors.items()}, step=step)

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors, for a checkpoint."""
        out: dict[str, Any] = {name: None if value is None else list(value) for name, value in self.tensors().items()}
        out["step"] = self.step
        return out

    @classmethod
    def from_state_dict(cls: type[S], state: dict[str, Any]) -> S:
        """The state a checkpoint holds. Checkpoints written before states were typed keep the
        engine-specific fields under "extra": they load into the same fields."""
        values = dict(state)
        values.update(values.pop("extra", None) or {})
        step = int(values.pop("step", 0))
        names = {f.name for f in dataclasses.fields(cls)} - {"step"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"the checkpoint's engine state has fields {', '.join(unknown)}, which {cls.__name__} does not"
                             f" declare ({', '.join(sorted(names))}): it was written by another engine")
        return cls(**{name: _as_params(value) for name, value in values.items()}, step=step)


def _as_params(value: Any) -> Any:
    return None if value is None else tuple(value)
