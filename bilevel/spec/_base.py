"""Shared base for every spec model: strict fields, documented, frozen once validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["SpecModel"]


class SpecModel(BaseModel):
    """Base of all spec models: unknown fields are errors and every field carries a description."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
