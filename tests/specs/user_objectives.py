"""Objectives for the bad-input tests."""

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field


def data():
    return {"x": torch.randn(20, 4), "t": torch.randn(20)}


def lower(upper, lower, batch):
    return 0.5 * ((batch["x"] @ lower["w"] - batch["t"]) ** 2).mean() + 0.5 * torch.exp(upper["lam"]) * (lower["w"] ** 2).sum()


def upper(upper, lower, batch):
    return 0.5 * ((batch["x"] @ lower["w"] - batch["t"]) ** 2).mean()


def two_args(upper, lower):
    return lower["w"].sum()


def vector_valued(upper, lower, batch):
    return lower["w"] * 2


def not_a_mapping():
    return [1, 2, 3]


def positive_constraint(upper, lower, batch):
    return (lower["w"] ** 2).sum().reshape(1) + 1.0


def sum_constraint(upper, lower, batch):
    return (lower["w"].sum() + upper["lam"]).reshape(1)


class ReportSettings(BaseModel):
    """A report's structured argument: validated at compile time through the annotation."""

    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(ge=0.0, le=1.0)
    label: str = "run"


def annotated_report(upper, lower, settings: ReportSettings, repeats: int = 1, plot: Any = None):
    return {"repeats": repeats, "fraction": settings.fraction}
