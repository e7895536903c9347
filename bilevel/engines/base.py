"""The engine interface: explicit state, declared capabilities, stats a user can trust."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from torch import Tensor

from bilevel.problem import Params, Problem

__all__ = ["Capabilities", "Engine", "EngineBase", "EngineState", "Hypergrad", "Stats"]

Convexity = Literal["strongly_convex", "convex", "nonconvex", "unknown"]


@dataclass(frozen=True)
class Capabilities:
    """What an engine assumes and what it costs; the planner reads only this."""

    summary: str
    """One line: what the engine computes."""
    needs_hvp: bool
    """Uses Hessian-vector products of the lower objective."""
    lower_convexity: tuple[Convexity, ...]
    """Lower-level convexity classes under which the engine's hypergradient is justified."""
    memory: Literal["constant", "horizon"]
    """constant: O(size of y) independent of the inner horizon; horizon: grows with the steps it differentiates."""
    exact_when_converged: bool = False
    """Gives the exact hypergradient when the inner problem (and linear solve) converge."""
    first_order: bool = False
    """Needs only first derivatives."""
    handles_constraints: bool = False
    """Accepts lower-level functional constraints."""
    handles_coupled_constraints: bool = False
    """Accepts lower-level constraints that involve the upper variables."""
    handles_discrete: bool = False
    """Accepts discrete or non-differentiable upper variables."""
    handles_architecture: bool = False
    """Accepts architecture-mixture upper variables."""
    unbounded_smoothness: bool = False
    """Designed for upper levels whose smoothness is unbounded (RNNs)."""
    outer_optimizer: str | None = None
    """The upper-level optimizer the algorithm is defined with (None: any)."""
    through_optimizer: bool = False
    """Differentiates through the inner optimizer's steps, so optimizer hyperparameters tuned by
    upper variables (lr, momentum) receive hypergradients."""
    returns_hypergradient: bool = True
    """Each call returns an estimate of dF/dx; False for single-loop methods whose per-step
    direction (a penalized gradient, a momentum estimate) is not a hypergradient by itself."""
    needs_best_response: bool = False
    """Needs a lower model that takes the hyperparameters as input (built from STN layers): a
    best-response approximation the engine fits."""
    handles_instances: bool = False
    """Solves a batch of independent instances (spec ``instances``) exactly as it solves each one
    alone: nothing in it couples the instances except through per-instance reductions."""


@dataclass
class EngineState:
    """Carried between hypergradient calls: the warm-started lower solution, the inner optimizer's
    state, and engine-specific tensors (e.g. the previous linear-system solution)."""

    lower: Params
    inner_state: Params
    extra: dict[str, Params] = field(default_factory=dict)
    step: int = 0
    """Hypergradient calls so far (schedules of single-loop engines read it)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "lower": list(self.lower),
            "inner_state": list(self.inner_state),
            "extra": {k: list(v) for k, v in self.extra.items()},
            "step": self.step,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "EngineState":
        extra = {k: tuple(v) for k, v in state["extra"].items()}
        return cls(tuple(state["lower"]), tuple(state["inner_state"]), extra, int(state.get("step", 0)))


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
    inner_steps: int
    """Inner optimizer steps taken for this hypergradient."""
    time_s: float
    """Host time spent in the call (on CUDA: launch time unless the caller synchronizes)."""
    extra: dict[str, Tensor | float] = field(default_factory=dict)
    """Engine-specific figures (a dominant Hessian eigenvalue, a perturbation scale, ...), logged
    beside the others in metrics.jsonl under their names."""

    def as_floats(self) -> dict[str, float | int | None]:
        return {
            "inner_residual": float(self.inner_residual),
            "linear_residual": None if self.linear_residual is None else float(self.linear_residual),
            "hvp_count": self.hvp_count,
            "inner_steps": self.inner_steps,
            "time_s": self.time_s,
            **{name: float(value) for name, value in self.extra.items()},
        }


@dataclass
class Hypergrad:
    """One hypergradient: dF/dx for each upper tensor, the upper loss, the new state, stats."""

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


@runtime_checkable
class Engine(Protocol):
    """A hypergradient engine. Engines are stateless objects built from their Config;
    everything that changes between calls lives in EngineState."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    capabilities: ClassVar[Capabilities]

    def init(self, problem: Problem, x: Params) -> EngineState: ...

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad: ...

    def post_step(self, problem: Problem, x: Params, state: EngineState) -> tuple[Params, EngineState]: ...


class EngineBase:
    """Defaults shared by the engines: built from a Config, start from the lower level's initial
    values, and leave the outer step alone (``post_step`` may project (x, y) jointly)."""

    Config: ClassVar[type]

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def init(self, problem: Problem, x: Params) -> EngineState:
        from bilevel.engines.inner import start_state

        return start_state(problem)

    def post_step(self, problem: Problem, x: Params, state: EngineState) -> tuple[Params, EngineState]:
        """Called after the outer optimizer moved x; returns (x, state), possibly projected."""
        return x, state
