"""Raw -> user value: the one place where an engine's unconstrained tensor becomes what user code sees.

Every tensor variable of a compiled level has a transform (plain tensors the identity). Engines
step the raw tensor r; objectives, tuned optimizer settings, monitors, reports and result.json see
``value(r)``; an STN-style model is conditioned on ``code(r)``, a flat encoding of the value:

    continuous, range (a, b):      value = a + (b - a) sigmoid(r)                 code = r
    continuous, range, log:        value = exp(log a + (log b - log a) sigmoid(r)) code = r
    continuous, no range:          value = r   (log: exp(r))                      code = r
    integer [a, b]:                value = round(c(r)),  c(r) = (a - 1/2) + (b - a + 1) sigmoid(r)
                                   (log: on log c), so each integer owns an equal slice of c;
                                   code = c^{-1}(value), the raw point of the integer used
    categorical (choices_1..K):    r are K logits; value = choices[argmax r];    code = one_hot(argmax r)

The bounded maps are the stretched sigmoids of MacKay et al. (2019), "Self-Tuning Networks", whose
hypernetworks see the unconstrained values. Gradients flow through ``value`` for continuous
hyperparameters; discrete ones are piecewise constant in r (STN samples them instead)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as nnf
from torch import Tensor

from bilevel.spec.hyperparameter import HyperparameterVariable

__all__ = [
    "Categorical",
    "Continuous",
    "Drawn",
    "IDENTITY",
    "Integer",
    "VariableTransform",
    "make_transform",
]


class Drawn(NamedTuple):
    """A value an engine substitutes for a variable's current one (e.g. an STN perturbation):
    ``value`` in user units, ``code`` its flat encoding for conditioned models."""

    value: Any
    code: Tensor


class VariableTransform:
    """Identity: a plain tensor variable is its own value and code. Subclasses override."""

    discrete: bool = False
    """Integer or categorical: the value is piecewise constant in the raw tensor."""
    gradient_free: bool = False
    """No gradient reaches the value (discrete, or declared non-differentiable)."""

    def value(self, raw: Tensor) -> Any:
        """The value in user units at raw."""
        return raw

    def code(self, raw: Tensor) -> Tensor:
        """The 1-D encoding of value(raw) that conditioned (STN) models receive."""
        return raw.reshape(-1)

    def describe(self) -> str:
        return "tensor"


IDENTITY = VariableTransform()


def _logit(u: float) -> float:
    return math.log(u) - math.log1p(-u)


@dataclass(frozen=True)
class _Interval:
    """x = lo + (hi - lo) sigmoid(r) and its inverse, on log x when ``log``."""

    low: float
    high: float
    log: bool

    @property
    def ends(self) -> tuple[float, float]:
        return (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)

    def forward(self, raw: Tensor) -> Tensor:
        lo, hi = self.ends
        x = lo + (hi - lo) * torch.sigmoid(raw)
        # exp(log a) may round just below a: clamp (gradient 1 inside the range)
        return torch.exp(x).clamp(self.low, self.high) if self.log else x

    def inverse(self, value: Tensor | float) -> Tensor | float:
        lo, hi = self.ends
        if isinstance(value, Tensor):
            x = torch.log(value) if self.log else value
            u = (x - lo) / (hi - lo)
            return torch.log(u) - torch.log1p(-u)
        x = math.log(value) if self.log else value
        return _logit((x - lo) / (hi - lo))


class Continuous(VariableTransform):
    """A real hyperparameter: bounded through a (log-)stretched sigmoid, else identity or exp."""

    def __init__(self, spec: HyperparameterVariable):
        self.spec = spec
        self.gradient_free = not spec.differentiable
        self.interval = None if spec.low is None else _Interval(spec.low, spec.high, spec.log)

    def value(self, raw: Tensor) -> Tensor:
        if self.interval is not None:
            return self.interval.forward(raw)
        return torch.exp(raw) if self.spec.log else raw

    def raw_of(self, value: float) -> float:
        """The raw point whose value is ``value`` (strictly inside the range)."""
        if self.interval is not None:
            return float(self.interval.inverse(value))
        return math.log(value) if self.spec.log else value

    def default_init(self) -> float:
        spec = self.spec
        if spec.low is None:
            return 1.0 if spec.log else 0.0
        return math.sqrt(spec.low * spec.high) if spec.log else 0.5 * (spec.low + spec.high)

    def describe(self) -> str:
        scale = "log " if self.spec.log else ""
        where = f"in ({self.spec.low:g}, {self.spec.high:g})" if self.interval is not None else "unbounded"
        return f"continuous {scale}{where}"


class Integer(VariableTransform):
    """An integer in [low, high]: the rounding of a continuous latent c(r) on which every integer
    owns an interval of equal length (on log c with ``log``)."""

    discrete = True
    gradient_free = True

    def __init__(self, spec: HyperparameterVariable):
        self.spec = spec
        self.low, self.high = int(spec.low), int(spec.high)
        self.latent = _Interval(self.low - 0.5, self.high + 0.5, spec.log)

    def value(self, raw: Tensor) -> Tensor:
        return torch.round(self.latent.forward(raw)).clamp(self.low, self.high).to(torch.int64)

    def raw_of_value(self, value: Tensor, dtype: torch.dtype) -> Tensor:
        """The raw point of an integer value (the centre of its slice of the latent)."""
        return self.latent.inverse(value.to(dtype))

    def code(self, raw: Tensor) -> Tensor:
        return self.raw_of_value(self.value(raw), raw.dtype).reshape(-1)

    def raw_of(self, value: float) -> float:
        return float(self.latent.inverse(float(value)))

    def default_init(self) -> float:
        if self.spec.log:
            return float(round(math.sqrt(self.low * self.high)))
        return float((self.low + self.high) // 2)

    def describe(self) -> str:
        return f"integer in [{self.low}, {self.high}]" + (" (log scale)" if self.spec.log else "")


class Categorical(VariableTransform):
    """One of K choices; the raw tensor holds K logits and the value is the argmax's choice."""

    discrete = True
    gradient_free = True
    INIT_LOGIT = 1.0
    """Logit of the initial choice (the others start at 0)."""

    def __init__(self, spec: HyperparameterVariable, device: torch.device, dtype: torch.dtype):
        assert spec.choices is not None  # validated by the spec
        self.spec = spec
        self.choices = list(spec.choices)
        first = self.choices[0]
        self.strings = isinstance(first, str)
        self.table: Tensor | None = None
        if not self.strings:
            if isinstance(first, bool):
                kind = torch.bool
            elif all(isinstance(c, int) for c in self.choices):
                kind = torch.int64
            else:
                kind = dtype
            self.table = torch.tensor(self.choices, dtype=kind, device=device)

    @property
    def size(self) -> int:
        return len(self.choices)

    def index_of(self, choice: Any) -> int:
        for index, candidate in enumerate(self.choices):
            if type(candidate) is type(choice) and candidate == choice:
                return index
        return self.choices.index(choice)  # 2 for 2.0: the spec accepted it as equal

    def initial_logits(self, init: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
        logits = torch.zeros(self.size, device=device, dtype=dtype)
        logits[self.index_of(self.choices[0] if init is None else init)] = self.INIT_LOGIT
        return logits

    def value_at(self, index: Tensor) -> Any:
        """The choice at a 0-d int64 index: a 0-d tensor for numbers and booleans (no host
        synchronization), a str for strings (reads the index on the host)."""
        if self.table is None:
            return self.choices[int(index)]
        return self.table.index_select(0, index.reshape(1)).reshape(())

    def value(self, raw: Tensor) -> Any:
        return self.value_at(torch.argmax(raw))

    def code(self, raw: Tensor) -> Tensor:
        return nnf.one_hot(torch.argmax(raw), self.size).to(raw.dtype)

    def describe(self) -> str:
        return f"categorical of {self.choices}"


def make_transform(spec: HyperparameterVariable, device: torch.device, dtype: torch.dtype) -> tuple[VariableTransform, Tensor]:
    """The transform of a hyperparameter variable and its raw initial tensor."""
    kw = {"device": device, "dtype": dtype}
    if spec.type == "categorical":
        transform = Categorical(spec, device, dtype)
        return transform, transform.initial_logits(spec.init, device, dtype)
    transform = Continuous(spec) if spec.type == "continuous" else Integer(spec)
    init = transform.default_init() if spec.init is None else float(spec.init)
    return transform, torch.full(tuple(spec.shape), transform.raw_of(init), **kw)
