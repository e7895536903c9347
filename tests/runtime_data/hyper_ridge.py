"""The ridge toy with the L2 strength as a hyperparameter variable in its own units (the objective
uses upper["strength"] directly, where problems.toy uses exp(upper["lam"]))."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    residual = batch["X"] @ lower["w"] - batch["t"]
    return 0.5 * (residual**2).mean() + 0.5 * (upper["strength"] * lower["w"] ** 2).sum()


def upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    residual = batch["X"] @ lower["w"] - batch["t"]
    return 0.5 * (residual**2).mean()


def categorical_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    residual = batch["X"] @ lower["w"] - batch["t"]
    return 0.5 * (residual**2).mean() + 0.5 * upper["strength"] * (lower["w"] ** 2).sum() * (upper["mode"] == "ridge")


def norm_budget(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """||w||^2 <= 100: feasible at the start (w = 0)."""
    return ((lower["w"] ** 2).sum() - 100.0).reshape(1)
