"""Learning-rate schedules as pure functions of the step, so that a resumed run follows the same
schedule and an engine can ask for the rate of any step.

A schedule runs over ``horizon`` steps t = 0 .. horizon - 1: an optional linear warm-up of W steps,

    lr_t = lr (t + 1) / (W + 1)                                   (t < W)

then a decay from lr to low = lr * final_lr_ratio over the remaining steps, with progress
p = (t - W) / (horizon - 1 - W) in [0, 1] (p = 1 from the last step on):

    constant:      lr_t = lr
    linear:        lr_t = lr + (low - lr) p
    cosine:        lr_t = low + (lr - low) c,                      c = (1 + cos(pi p)) / 2
    cosine_power:  lr_t = low + (lr - low) (k^c - 1) / (k - 1)     (k = 1: cosine)

Cosine power annealing (Hundt, Jain & Hager 2019, "sharpDARTS: Faster and More Accurate
Differentiable Architecture Search", section 3.3) raises the base k to the cosine: normalized to
[0, 1], k^(c + 1) of the paper is (k^c - 1) / (k - 1). It falls faster than cosine early and
flattens out near the minimum; k -> 1 recovers cosine annealing, large k tends to an exponential
decay. The official code (``ahundt/sharpDARTS``, ``cnn/cosine_power_annealing.py``) indexes
epochs from 1, warms up linearly over 5 epochs and reaches the peak at the end of the warm-up;
this is its step-indexed reading: the peak at step W, the minimum at the last step."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "schedule_factor", "scheduled_value"]

SCHEDULES = ("constant", "cosine", "linear", "cosine_power")
"""The schedule names (``OptimizerSpec.schedule``, ``RetrainSpec.schedule``)."""


def schedule_factor(schedule: str, progress: float, power_base: float = 2.0) -> float:
    """The decay's share of (lr - low) left at ``progress`` p in [0, 1]: 1 at p = 0, 0 at p = 1
    (1 throughout for ``constant``)."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - p
    cosine = 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "cosine":
        return cosine
    if schedule == "cosine_power":
        if power_base < 1.0:
            raise ValueError(f"power_base must be at least 1 (got {power_base})")
        return cosine if power_base == 1.0 else (power_base**cosine - 1.0) / (power_base - 1.0)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def scheduled_value(
    lr: float,
    step: int,
    horizon: int,
    schedule: str = "constant",
    final_ratio: float = 0.0,
    power_base: float = 2.0,
    warmup: int = 0,
) -> float:
    """The learning rate at step ``step`` (0-based) of a schedule spanning ``horizon`` steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule == "constant" or horizon <= 1:
        return lr
    decay = horizon - 1 - warmup
    progress = 1.0 if decay <= 0 else (step - warmup) / decay
    low = lr * final_ratio
    if schedule == "linear":  # these two in the arithmetic runs have always used: bitwise the same rates
        return lr + (low - lr) * min(progress, 1.0)
    if schedule == "cosine":
        return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * min(progress, 1.0)))
    return low + (lr - low) * schedule_factor(schedule, progress, power_base)
