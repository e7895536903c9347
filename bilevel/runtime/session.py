"""A run's state between outer steps: the upper variables, the outer optimizer, the engine's
state, the data streams and the RNG, with one ``state_dict`` that a checkpoint stores and from
which a killed run resumes to the same result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bilevel.engines.base import Engine, EngineState
from bilevel.problem import Params, Problem
from bilevel.runtime.checkpoint import WorldSizeMismatch, load_snapshot, save_state
from bilevel.runtime.outer import build_outer_optimizer

__all__ = ["Session"]


@dataclass
class Session:
    """What the outer loop carries from step to step (x are leaves the outer optimizer moves)."""

    problem: Problem
    engine: Engine
    x: Params
    optimizer: torch.optim.Optimizer
    state: EngineState
    step: int = 0
    resumed: bool = False

    @classmethod
    def start(cls, problem: Problem, engine: Engine) -> Session:
        """Step 0: the upper variables' initial values, a fresh outer optimizer from the top
        level's solver, the engine's initial state."""
        x = problem.fresh(problem.upper.init, requires_grad=True)
        return cls(problem, engine, x, build_outer_optimizer(problem.upper.solver, x), engine.init(problem, x))

    @property
    def upper(self) -> Params:
        """The upper variables, detached."""
        return tuple(p.detach() for p in self.x)

    def set_upper(self, values: Params) -> None:
        with torch.no_grad():
            for p, value in zip(self.x, values):
                p.copy_(value.to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors on the host); ``data`` and ``rng`` are this
        rank's own (``bilevel.runtime.checkpoint.LOCAL``)."""
        problem = self.problem
        return {
            "step": self.step,
            "fingerprint": problem.fingerprint,
            "x": [p.detach().cpu() for p in self.x],
            "optimizer": self.optimizer.state_dict(),
            "engine_state": _to_device(self.state.state_dict(), torch.device("cpu")),
            "data": {n: lvl.data.state_dict() for n, lvl in problem.levels.items() if lvl.data is not None},
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, checkpoint: dict[str, Any], local: dict[str, Any]) -> None:
        """Resume from a checkpoint (its replicated part, and this rank's ``local`` part)."""
        problem = self.problem
        self.set_upper(tuple(checkpoint["x"]))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.state = self.engine.State.from_state_dict(_to_device(checkpoint["engine_state"], problem.device))
        for name, level in problem.levels.items():  # this rank's data streams, over its shards
            if level.data is not None and name in local["data"]:
                level.data.load_state_dict(local["data"][name])
        torch.set_rng_state(local["rng"])
        self.step = int(checkpoint["step"])
        self.resumed = True

    def save(self, directory: Path) -> Path:
        """A checkpoint of the current state in ``directory`` (collective: every rank calls it)."""
        return save_state(directory, self.state_dict())

    def resume(self, directory: Path) -> bool:
        """Load the latest checkpoint in ``directory`` when there is one (collective); a SpecError
        when it belongs to another spec or another number of processes."""
        try:
            loaded = load_snapshot(directory)
        except WorldSizeMismatch as exc:
            raise self.problem.source.error("", str(exc)) from None
        if loaded is None:
            return False
        checkpoint, local = loaded
        if checkpoint["fingerprint"] != self.problem.fingerprint:
            raise self.problem.source.error("", f"the checkpoint in {directory} was written for a different spec; use another"
                                                " --out or drop --resume")
        self.load_state_dict(checkpoint, local)
        return True


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
