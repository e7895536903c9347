"""State an inner optimizer carries beyond its own: a step count for tuned schedules, and the
learning rate and previous direction of hypergradient descent.

**Schedules.** A tuned hyperparameter read as a schedule (``OptimizerSpec.tuned_schedule``) is a
vector h of K entries; step t (counted from 0) uses

    h_t = h[min(floor(t K / horizon), K - 1)],

with t read from the state (adam's own step count; sgd and momentum get one), so a schedule works
wherever the state goes: through unrolled, checkpointed and truncated reverse mode, forward mode
and warm starts. The entry is picked by tensor indexing: no host synchronization.

**Hypergradient descent** (A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood,
"Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018). The step y_t =
y_{t-1} - lr u_t (u = g for sgd, Adam's bias-corrected m / (sqrt v + eps) for adam) makes
df(y_{t-1})/dlr = -<g_t, u_{t-1}>, so one gradient step on lr before each update is

    lr_t = lr_{t-1} + beta <g_t, u_{t-1}>,      u_0 = 0,  lr_0 = the spec's lr,

the inner product taken over all of the level's variables together. lr_t and u_t are state:
differentiable like the rest of it, so the unrolled and forward engines differentiate through
the adaptation as well."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Extras", "scheduled_entry"]

Tree = tuple[Tensor, ...]


def scheduled_entry(values: Tensor, step: Tensor, horizon: int) -> Tensor:
    """values[min(floor(step K / horizon), K - 1)] for a vector of K values (a scalar: itself)."""
    if values.dim() == 0:
        return values
    k = values.shape[0]
    index = torch.div(step.detach() * k, horizon, rounding_mode="floor").long().clamp(0, k - 1)
    return values[index]


class Extras:
    """The extra state of one optimizer spec: its layout, initial values and update. The state of
    an InnerOptimizer is (own state, *extras), own being () for sgd, the velocity for momentum,
    (m, v, count) for adam; extras are (count) for a schedule on sgd / momentum, then
    (lr, *u) for hypergradient descent."""

    def __init__(self, spec: Any):
        self.spec = spec
        schedule = spec.tuned_schedule
        self.scheduled: tuple[str, ...] = tuple(schedule.hyperparameters) if schedule is not None else ()
        self.horizon: int = (schedule.horizon or spec.steps or 1) if schedule is not None else 1
        self.counts = bool(self.scheduled) and spec.name != "adam"
        self.beta: float | None = spec.lr_hypergradient

    def __bool__(self) -> bool:
        return bool(self.scheduled) or self.beta is not None

    def own_length(self, n: int) -> int:
        """Tensors of the optimizer's own state for n parameters."""
        return {"sgd": 0, "momentum": n}.get(self.spec.name, 2 * n + 1)

    def init(self, params: Sequence[Tensor]) -> Tree:
        if not self:
            return ()
        like = params[0]
        out: list[Tensor] = []
        if self.counts:
            out.append(torch.zeros((), dtype=like.dtype, device=like.device))
        if self.beta is not None:
            out.append(torch.full((), self.spec.lr, dtype=like.dtype, device=like.device))
            out += [torch.zeros_like(p) for p in params]
        return tuple(out)

    def split(self, state: Tree, n: int) -> tuple[Tree, Tree]:
        own = self.own_length(n)
        return state[:own], state[own:]

    def before(self, own: Tree, extra: Tree, grads: Sequence[Tensor], hyper: Mapping[str, Tensor] | None
               ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The hyperparameters of this step (schedule entries, the adapted lr) and the new lr."""
        values = dict(hyper or {})
        if self.scheduled:
            step = extra[0] if self.counts else own[-1]
            for name in self.scheduled:
                if name in values:  # a non-scalar tuned value comes as a one-tensor tuple (Problem.tuned_hyperparameters)
                    value = values[name]
                    value = value[0].reshape(-1) if isinstance(value, tuple) else value
                    values[name] = scheduled_entry(value, step, self.horizon)
        lr = None
        if self.beta is not None:
            start = int(self.counts)
            lr, previous = extra[start], extra[start + 1 :]
            lr = lr + self.beta * sum((g * u).sum() for g, u in zip(grads, previous))
            values["lr"] = lr
        return values, lr

    def after(self, extra: Tree, direction: Sequence[Tensor], lr: Tensor | None) -> Tree:
        """The extra state after the step whose direction (y_t = y_{t-1} - lr u_t) was ``direction``."""
        out: list[Tensor] = []
        if self.counts:
            out.append(extra[0].detach() + 1)  # a constant of the trajectory, like adam's count
        if self.beta is not None:
            assert lr is not None
            out += [lr, *direction]
        return tuple(out)
