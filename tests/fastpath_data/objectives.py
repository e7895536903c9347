"""Objectives that break the fast path's assumptions, for its fallback tests."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from problems.hyperclean import lower_objective, upper_objective


def syncing_lower(upper: Any, lower: Any, batch: dict[str, Tensor], mu: float = 1e-3) -> Tensor:
    """The hyper-cleaning lower objective, with a Python branch on a tensor value (a host sync)."""
    value = lower_objective(upper, lower, batch, mu)
    if value > 1e6:  # reads the value on the host
        return 0 * value
    return value


def syncing_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """The validation loss, converted to a Python float and back on the way (a host sync)."""
    value = upper_objective(upper, lower, batch)
    return value * (float(value.detach()) / float(value.detach()))


def lam_mean(upper: Any, lower: Any, *, step: int, out_dir: Any, scale: float = 1.0) -> dict[str, Any]:
    """A monitor: the mean example weight logit, times ``scale``."""
    return {"lam_mean": scale * float(upper["lam"].mean()), "step": step}
