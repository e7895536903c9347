"""JSON Schema of the spec, as exported by `bilevel schema`."""

from __future__ import annotations

from typing import Any

from bilevel.spec.problem import BilevelSpec

__all__ = ["spec_schema"]


def spec_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a bilevel spec file."""
    schema = BilevelSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "bilevel spec"
    return schema
