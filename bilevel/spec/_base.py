"""Shared base for every spec model: strict fields, documented, frozen once validated."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["REFERENCE_PATTERN", "CallableRef", "ModuleRef", "Reference", "SpecModel"]

REFERENCE_PATTERN = r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_.]*$"
"""A reference to user code: "package.module:attr" or "path/to/file.py:attr"."""

Reference = Annotated[str, Field(pattern=REFERENCE_PATTERN)]
"""A reference to user code (the field's docstring describes it)."""

CallableRef = Annotated[
    str,
    Field(
        pattern=REFERENCE_PATTERN,
        description='Reference to user code: "package.module:attr" or "path/to/file.py:attr" '
        "(relative to the spec file).",
    ),
]
"""A reference to user code that carries its own description in the JSON schema."""

ModuleRef = Annotated[str, Field(pattern=r"^[^:\s]+$")]
"""A module to import: "package.module" or "path/to/file.py"."""


class SpecModel(BaseModel):
    """Base of all spec models: unknown fields are errors and every field carries a description."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
