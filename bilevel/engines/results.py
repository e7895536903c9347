"""What one engine call returns: the direction for the upper variables, the upper loss, the new
state, and the figures a user needs to trust it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from bilevel.engines.state import EngineState
from bilevel.problem import Params

__all__ = ["Hypergrad", "Stats"]


@dataclass
class Stats:
    """What a user needs to trust a hypergradient. Tensors stay on the device until logged."""

    inner_residual: Tensor
    """||grad_y G(x, y)|| at the lower point the hypergradient used (unrolled: at the last inner
    iterate whose gradient the loop evaluated, y_{T-1}, which costs nothing extra)."""
    linear_residual: Tensor | None
    """||H v - b|| / ||b|| of the linear solve (None for engines without one)."""
    hvp_count: int
    """Hessian-vector products (for unrolled: second-order products done by the backward pass)."""
    inner_steps: int | Tensor
    """Inner optimizer steps taken for this hypergradient (a 0-d tensor on the device where the
    solve stops on its residual: the steps before the stop held)."""
    time_s: float = 0.0
    """Host time spent in the call (on CUDA: launch time unless the caller synchronizes); set by
    ``EngineBase.hypergrad`` around the engine's ``compute``."""
    extra: dict[str, Tensor | float] = field(default_factory=dict)
    """Engine-specific figures (a dominant Hessian eigenvalue, a perturbation scale, ...), logged
    beside the others in metrics.jsonl under their names."""

    def as_floats(self) -> dict[str, float | int | None]:
        return {
            "inner_residual": float(self.inner_residual),
            "linear_residual": None if self.linear_residual is None else float(self.linear_residual),
            "hvp_count": self.hvp_count,
            "inner_steps": int(self.inner_steps),
            "time_s": self.time_s,
            **{name: float(value) for name, value in self.extra.items()},
        }


@dataclass
class Hypergrad:
    """One engine step: a direction for each upper tensor, the upper loss, the new state, stats.
    ``estimate`` says what the direction is: a hypergradient dF/dx, or the search direction of a
    single-loop method (a penalized gradient, a momentum estimate)."""

    grad: Params
    upper_loss: Tensor
    state: EngineState
    stats: Stats
    stop: str | None = None
    """Set by an engine whose own criterion ends the run (e.g. an early-stopping guard): the outer
    loop applies no step for this call, writes a checkpoint and finishes with this reason."""
    upper: Params | None = None
    """With ``stop``: the upper values the run ends with (e.g. the earlier architecture an
    early-stopping rule returns to); None keeps the current ones."""
    estimate: Literal["hypergradient", "search_direction"] = "hypergradient"

    @property
    def is_hypergradient(self) -> bool:
        return self.estimate == "hypergradient"

    def finished(self, time_s: float, is_hypergradient: bool) -> Hypergrad:
        """This result detached from any graph, with the call's time and what its direction is."""
        return dataclasses.replace(
            self,
            grad=tuple(g.detach() for g in self.grad),
            upper_loss=self.upper_loss.detach(),
            stats=dataclasses.replace(self.stats, time_s=time_s),
            estimate="hypergradient" if is_hypergradient else "search_direction",
        )
