"""Hyperparameter variables: values with a type and a range, declared in the user's units.

Engines optimize an unconstrained raw tensor; objectives, tuned optimizer settings, monitors,
reports and result.json see the value in the declared units (see ``bilevel.hyperparameters`` for
the maps raw -> value). A continuous hyperparameter with a range (low, high) is
low + (high - low) sigmoid(raw) (on log(value) when ``log``); without a range it is raw (exp(raw)
when ``log``). Integer and categorical ones are discrete: only engines that declare
``handles_discrete`` (STN) take them."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator

from bilevel.spec._base import SpecModel

__all__ = ["Choice", "HyperparameterVariable"]

Choice = Union[bool, int, float, str]
"""One choice of a categorical hyperparameter: a number, a boolean or a string."""


class HyperparameterVariable(SpecModel):
    """A hyperparameter of the upper level, declared by its type and range in its own units.

    Objectives receive the value in those units (``upper["dropout"]`` is a rate in (low, high));
    engines optimize an unconstrained raw tensor behind it."""

    kind: Literal["hyperparameter"] = "hyperparameter"
    """Discriminator: a hyperparameter."""
    type: Literal["continuous", "integer", "categorical"] = "continuous"
    """continuous: a real number (or tensor of them); integer: an integer in [low, high]
    (objectives get an int64 tensor); categorical: one of ``choices``. Integer and categorical
    hyperparameters are discrete: the planner picks STN for them and refuses engines that need
    gradients in the upper variables."""
    log: bool = False
    """Search on a log scale: the raw variable moves log(value), so 1e-4 -> 1e-3 is as far as
    1e-3 -> 1e-2. Needs low > 0 (integer: low >= 1)."""
    low: float | None = Field(default=None, validate_default=True)
    """Lower end of the range (continuous: open, integer: included). Continuous: give both low and
    high, or neither (then the value is unbounded, or positive with ``log``); integer: required."""
    high: float | None = Field(default=None, validate_default=True)
    """Upper end of the range (continuous: open, integer: included); greater than low (an integer's may equal it)."""
    choices: list[Choice] | None = Field(default=None, validate_default=True)
    """Categorical: the values to choose from (numbers, booleans or strings, not mixed; unique).
    Objectives receive the chosen value: a 0-d tensor for numbers and booleans, a str for strings."""
    init: Choice | None = Field(default=None, validate_default=True)
    """Initial value in the declared units. Default: the middle of the range (the geometric middle
    with ``log``; 0, or 1 with ``log``, when unbounded), or the first choice."""
    shape: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    """Shape of a continuous hyperparameter ([] is a scalar; e.g. [3] for one dropout rate per
    layer, or a per-weight L2 strength); integer and categorical hyperparameters are scalars."""
    differentiable: bool = True
    """Continuous only: whether the objectives are differentiable in this value. A dropout rate that
    samples masks, or a setting used through Python control flow, is not: then only engines that
    handle non-differentiable hyperparameters (STN) can tune it, and the planner picks one."""

    @field_validator("low")
    @classmethod
    def _low(cls, low: float | None, info: ValidationInfo) -> float | None:
        kind, log = info.data.get("type"), info.data.get("log")
        if kind == "categorical":
            if low is not None:
                raise ValueError("a categorical hyperparameter has choices, not a range: remove low")
            return low
        if kind == "integer":
            if low is None:
                raise ValueError("an integer hyperparameter needs its range: give low and high")
            if low != math.floor(low):
                raise ValueError(f"an integer hyperparameter's low must be an integer (got {low})")
        if low is not None and not math.isfinite(low):
            raise ValueError(f"low must be a finite number (got {low}); leave low and high out for an unbounded value")
        if log and low is not None and low <= 0:
            raise ValueError(f"a log-scale hyperparameter needs low > 0 (got {low})")
        return low

    @field_validator("high")
    @classmethod
    def _high(cls, high: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("type")
        if kind == "categorical":
            if high is not None:
                raise ValueError("a categorical hyperparameter has choices, not a range: remove high")
            return high
        if "low" not in info.data:  # low itself was invalid and is reported
            return high
        low = info.data["low"]
        if kind == "integer" and high is None:
            raise ValueError("an integer hyperparameter needs its range: give low and high")
        if high is not None and not math.isfinite(high):
            raise ValueError(f"high must be a finite number (got {high}); leave low and high out for an unbounded value")
        if (low is None) != (high is None):
            raise ValueError("give both low and high (a range), or neither (an unbounded value)")
        if kind == "integer" and high != math.floor(high):
            raise ValueError(f"an integer hyperparameter's high must be an integer (got {high})")
        if low is not None and high is not None:
            if low > high:
                raise ValueError(f"the range is empty: low ({low:g}) is greater than high ({high:g})")
            if kind == "continuous" and low == high:
                raise ValueError(f"the range is empty: low = high = {low:g} (use a constant instead)")
        return high

    @field_validator("choices")
    @classmethod
    def _choices(cls, choices: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        kind = info.data.get("type")
        if kind != "categorical":
            if choices is not None:
                raise ValueError(f"choices belong to categorical hyperparameters (this one is {kind}): remove choices or set type: categorical")
            return choices
        if not choices:
            raise ValueError("a categorical hyperparameter needs a non-empty list of choices")
        kinds = {_choice_kind(c) for c in choices}
        if len(kinds) > 1:
            raise ValueError(f"choices must be all numbers, all booleans or all strings (got {sorted(kinds)})")
        if len({(type(c), c) for c in choices}) != len(choices) or len(set(choices)) != len(choices):
            raise ValueError(f"choices must be unique (got {choices})")
        return choices

    @field_validator("init")
    @classmethod
    def _init(cls, init: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("type")
        if kind == "categorical":
            choices = info.data.get("choices")
            if init is not None and choices and not any(_same_choice(init, c) for c in choices):
                raise ValueError(f"init {init!r} is not one of the choices {choices}")
            return init
        if init is None:
            return init
        if isinstance(init, str):
            try:
                init = float(init)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise ValueError(f"a {kind} hyperparameter's init must be a number (got {init!r})") from None
        if isinstance(init, bool):
            raise ValueError(f"a {kind} hyperparameter's init must be a number (got {init!r})")
        if not ("low" in info.data and "high" in info.data):
            return init  # the range itself was invalid and is reported
        low, high, log = info.data["low"], info.data["high"], info.data.get("log")
        if not math.isfinite(init):
            raise ValueError(f"init must be a finite number (got {init})")
        if kind == "integer":
            if init != math.floor(init):
                raise ValueError(f"an integer hyperparameter's init must be an integer (got {init})")
            if not low <= init <= high:
                raise ValueError(f"init {init:g} is outside the range [{low:g}, {high:g}]")
        elif low is not None:
            if not low < init < high:
                raise ValueError(f"init {init:g} must lie strictly inside the range ({low:g}, {high:g})")
        elif log and init <= 0:
            raise ValueError(f"a log-scale hyperparameter's init must be > 0 (got {init:g})")
        return init

    @field_validator("shape")
    @classmethod
    def _shape(cls, shape: list[int], info: ValidationInfo) -> list[int]:
        kind = info.data.get("type")
        if kind in ("integer", "categorical") and shape:
            raise ValueError(f"{'an' if kind == 'integer' else 'a'} {kind} hyperparameter is a scalar: remove shape"
                             " (or declare one variable per value)")
        return shape


def _choice_kind(choice: Any) -> str:
    if isinstance(choice, bool):
        return "boolean"
    if isinstance(choice, (int, float)):
        return "number"
    return "string"


def _same_choice(a: Any, b: Any) -> bool:
    return _choice_kind(a) == _choice_kind(b) and a == b
