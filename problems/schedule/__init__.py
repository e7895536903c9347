"""Online learning-rate and momentum schedules for an MLP on digits: RTHO against hand-tuned
constant and cosine schedules and against short-horizon reverse mode (see README.md).

One training run of N = run.steps x Delta momentum-SGD steps on minibatches of the digits
training split (problems/hpo/digits.py: 500 train / 500 validation / 797 test). The learning
rate and the momentum are upper hyperparameter variables read by the inner solver
(``solver.tuned``), updated every Delta = ``solver.steps`` inner steps from the hypergradient of
the validation loss:

* ``rtho``: the forward engine online (RTHO, Franceschi et al. 2017): the tangents dy/d(lr, mu)
  are carried through the whole run, never reset;
* ``unrolled``: the same online scheme with reverse mode through the last Delta steps only
  (warm-started unrolling; the greedy, short-horizon hypergradient of Wu et al. 2018);
* ``constant`` and ``cosine``: no hypergradient; plain momentum SGD with a fixed momentum of 0.9
  and a constant or cosine-decayed learning rate, the peak picked on the validation split from a
  small grid (``train_schedule``, ``hand_tuned``)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as nnf

from bilevel.data import DataStream
from bilevel.spec import BilevelSpec, spec_from_data
from problems.hpo.digits import Mlp, split

__all__ = ["GRID", "hand_tuned", "schedule_spec", "train_schedule"]

GRID = (0.01, 0.03, 0.1, 0.3)
"""The learning rates (constant) and peaks (cosine) the hand-tuned baselines choose from."""


def schedule_spec(engine: dict[str, Any] | None = None, seed: int = 0, steps: int = 50, delta: int = 20,
                  hidden: int = 64, **run: Any) -> BilevelSpec:
    """The preset (``digits_rtho.yaml``) as a model: ``steps`` hypergradient updates, one every
    ``delta`` inner steps; ``engine`` replaces the forward engine online."""
    return spec_from_data({
        "name": "schedule-digits",
        "levels": {
            "upper": {
                "variables": {
                    "lr": {"kind": "hyperparameter", "log": True, "low": 1e-3, "high": 1.0, "init": 0.01},
                    "momentum": {"kind": "hyperparameter", "low": 0.0, "high": 0.99, "init": 0.5},
                },
                "objective": "problems.hpo.digits:mlp_upper",
                "data": {"source": "problems.hpo.digits:val_data"},
                "solver": {"name": "adam", "lr": 0.05},
            },
            "lower": {
                "parent": "upper",
                "variables": {"net": {"kind": "module", "factory": "problems.hpo.digits:Mlp", "kwargs": {"hidden": [hidden]}}},
                "objective": "problems.hpo.digits:mlp_lower",
                "data": {"source": "problems.hpo.digits:train_data", "batch_size": 50},
                "solver": {"name": "momentum", "steps": delta, "warm_start": True, "tuned": {"lr": "lr", "momentum": "momentum"}},
                "assumptions": {"convexity": "nonconvex"},
            },
        },
        "engine": engine or {"kind": "forward", "online": True},
        "monitor": "bilevel.trajectories:record_hyperparameters",
        "report": "problems.hpo.digits:mlp_report",
        "run": {"device": "cpu", "seed": seed, "steps": steps, "monitor_every": 1, "checkpoint_every": None, **run},
    })


def _accuracy(net: Mlp, part: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((net(part["x"]).argmax(1) == part["y"]).float().mean())


def train_schedule(peak: float, schedule: str, steps: int = 1000, momentum: float = 0.9, seed: int = 0,
                   hidden: int = 64, batch_size: int = 50) -> dict[str, float]:
    """Plain PyTorch momentum SGD for ``steps`` steps at a constant or cosine-decayed (to 0)
    learning rate; validation and test accuracy and the wall time."""
    began = time.perf_counter()
    parts = split()
    torch.manual_seed(seed)
    net = Mlp((hidden,))
    optimizer = torch.optim.SGD(net.parameters(), lr=peak, momentum=momentum)
    batches = DataStream(parts["train"], batch_size, seed)
    for t in range(steps):
        if schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * peak * (1 + math.cos(math.pi * t / steps))
        batch = batches.next()
        loss = nnf.cross_entropy(net(batch["x"]), batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"val_accuracy": _accuracy(net, parts["val"]), "test_accuracy": _accuracy(net, parts["test"]),
            "wall_time_s": time.perf_counter() - began}


def hand_tuned(schedule: str, seed: int = 0, steps: int = 1000, grid: tuple[float, ...] = GRID) -> dict[str, float]:
    """The grid point with the best validation accuracy (its test accuracy), and the grid's total time."""
    trials = {peak: train_schedule(peak, schedule, steps, seed=seed) for peak in grid}
    peak = max(trials, key=lambda p: trials[p]["val_accuracy"])
    return {**trials[peak], "lr": peak, "wall_time_s": sum(t["wall_time_s"] for t in trials.values()),
            "one_run_s": trials[peak]["wall_time_s"]}
