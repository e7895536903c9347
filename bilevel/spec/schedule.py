"""Tuned optimizer hyperparameters read as schedules: a vector of K values, one per block of steps."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from bilevel.spec._base import SpecModel

__all__ = ["TunedSchedule"]


class TunedSchedule(SpecModel):
    """Which tuned hyperparameters of an inner solver are piecewise-constant schedules.

    Each named upper variable has shape [K]; inner step t (t = 0, 1, ...) uses its entry
    floor(t K / horizon), clamped to K - 1. The step count is part of the optimizer's state: it
    restarts with every solve that starts a fresh optimizer state (the unrolled and forward
    engines), and keeps counting where the state is carried (the forward engine's online mode,
    RTHO), so set ``horizon`` to the steps of the whole run there."""

    hyperparameters: list[Literal["lr", "momentum"]] = Field(default_factory=lambda: ["lr"], min_length=1)
    """The tuned hyperparameters (keys of the solver's ``tuned``) read as schedules."""
    horizon: Annotated[int, Field(ge=1)] | None = None
    """Inner steps the K entries span; None: the solver's ``steps`` (one solve)."""
