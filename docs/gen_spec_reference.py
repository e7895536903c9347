"""Generate docs/spec-reference.md from the JSON Schema of the spec.

The schema (``bilevel.spec.spec_schema()``, what ``bilevel schema`` prints) is the source of
truth: one table per model in ``$defs`` plus the top level, with each field's type, default and
description. Two gaps of the exported schema are filled from the spec models themselves:

* defaults built by a ``default_factory`` (``{}``, ``[]``, nested models) are not in the schema;
* a field whose type carries its own description (the ``"module:attr"`` reference type) loses
  the field's docstring in the schema; the docstring is read from the model's source.

    python docs/gen_spec_reference.py           # rewrite docs/spec-reference.md
    python docs/gen_spec_reference.py --check   # exit 1 if docs/spec-reference.md is out of date
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bilevel.engines as engines_module  # noqa: E402
import bilevel.spec as spec_module  # noqa: E402
from bilevel.spec import spec_schema  # noqa: E402

__all__ = ["TARGET", "check", "render"]

TARGET = ROOT / "docs" / "spec-reference.md"

# Sections in reading order; models of the schema not listed here follow alphabetically.
ORDER = [
    "LevelSpec",
    "TensorVariable",
    "ModuleVariable",
    "HyperparameterVariable",
    "BoxSet",
    "SimplexSet",
    "L1Prox",
    "ElasticNetProx",
    "GroupLassoProx",
    "CustomProx",
    "DataSpec",
    "OptimizerSpec",
    "TunedSchedule",
    "Assumptions",
    "ConstraintSpec",
    "ProxSpec",
    "AutoEngine",
    "ImplicitConfig",
    "LinearSolverSpec",
    "UnrolledConfig",
    "PrecisionSpec",
    "ForwardConfig",
    "ZeroOrderConfig",
    "PenaltyConfig",
    "BORepConfig",
    "BSVRBConfig",
    "LVHBAConfig",
    "DartsConfig",
    "RartsConfig",
    "ArchitectureVariable",
    "SupernetVariable",
    "ConvSearchSpace",
    "MLPSearchSpace",
    "MacroSearchSpace",
    "CellSpec",
    "RetrainSpec",
    "StnConfig",
    "RunSpec",
    "BudgetSpec",
    "InstancesSpec",
    "BlocksSpec",
    "TasksSpec",
]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def _anchor(name: str) -> str:
    return name.lower()


def _type(prop: dict[str, Any]) -> str:
    """A readable type for a property of the schema."""
    if "$ref" in prop:
        name = prop["$ref"].split("/")[-1]
        return f"[{name}](#{_anchor(name)})"
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " | ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return " or ".join(_type(p) for p in prop[key])
    kind = prop.get("type", "any")
    if kind == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_type(p) for p in prop["prefixItems"]) + "]"
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object":
        extra = prop.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"mapping name -> {_type(extra)}"
        return "mapping"
    if "pattern" in prop:
        if ":" in prop["pattern"] and "[^:" in prop["pattern"] and prop["pattern"] != r"^[^:\s]+$":
            return 'reference `"module:attr"` / `"file.py:attr"`'
        if prop["pattern"] == r"^[^:\s]+$":
            return 'module `"package.module"` / `"file.py"`'
        return f"{kind} matching `{prop['pattern']}`"
    bounds = [
        f"{symbol} {prop[key]}"
        for key, symbol in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
        if key in prop
    ]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _model_class(name: str) -> Any:
    """The pydantic model of a schema definition (None when it is not a spec model)."""
    cls = getattr(spec_module, name, None) or getattr(engines_module, name, None)
    return cls if inspect.isclass(cls) and hasattr(cls, "model_fields") else None


def _attribute_docstrings(cls: Any) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    if cls is None:
        return {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            out[node.target.id] = inspect.cleandoc(following.value.value)
    return out


def _factory_default(cls: Any, field: str) -> str | None:
    """The default of a field built by a default_factory, as a table cell (None if there is none)."""
    if cls is None or field not in cls.model_fields:
        return None
    factory = cls.model_fields[field].default_factory
    if factory is None:
        return None
    value = factory()
    if hasattr(value, "model_dump"):
        name = type(value).__name__
        return f"defaults of [{name}](#{_anchor(name)})" if name != "AutoEngine" else '`{"kind": "auto"}`'
    return f"`{json.dumps(value)}`"


def _description(prop: dict[str, Any], docstring: str | None, defs: dict[str, Any]) -> str:
    text = _one_line(prop.get("description", ""))
    if not text and "$ref" in prop:  # pydantic drops a field description equal to the model's
        text = _one_line(defs.get(prop["$ref"].split("/")[-1], {}).get("description", ""))
    if docstring and _one_line(docstring) not in text:
        text = f"{_one_line(docstring)} {text}".strip()
    return text


def _table(name: str, model: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    cls = _model_class(name)
    docstrings = _attribute_docstrings(cls)
    required = set(model.get("required", []))
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for field, prop in model.get("properties", {}).items():
        if field in required:
            default = "required"
        elif "default" in prop:
            default = f"`{json.dumps(prop['default'])}`"
        else:
            default = _factory_default(cls, field) or ""
        description = _description(prop, docstrings.get(field), defs)
        lines.append(f"| `{field}` | {_cell(_type(prop))} | {default} | {_cell(description)} |")
    return lines


def render() -> str:
    """The whole reference page as markdown."""
    schema = spec_schema()
    defs: dict[str, Any] = schema.get("$defs", {})
    names = [n for n in ORDER if n in defs] + sorted(n for n in defs if n not in ORDER)
    out = [
        "# Spec reference",
        "",
        "<!-- Generated by `python docs/gen_spec_reference.py` from the JSON Schema; do not edit by hand. -->",
        "",
        "Every field of a spec file, generated from its JSON Schema (`bilevel schema` prints the schema",
        "itself; point an editor's YAML plugin at it for completion). A spec is YAML or JSON; unknown",
        "fields are errors, and `bilevel validate SPEC` names the file, line and dotted path of each one.",
        "A field's `kind` selects the branch of a union (engines, variables, sets); where `kind` is",
        'omitted, a variable is a `"tensor"` and a set is a `"box"`. References to user code are',
        '`"package.module:attr"` or `"path/to/file.py:attr"`, a path being relative to the spec file.',
        "",
        "Models: [BilevelSpec](#bilevelspec-the-top-level) · " + " · ".join(f"[{n}](#{_anchor(n)})" for n in names),
        "",
        "## BilevelSpec (the top level)",
        "",
        _one_line(schema.get("description", "")),
        "",
        *_table("BilevelSpec", schema, defs),
    ]
    for name in names:
        model = defs[name]
        out += ["", f"## {name}", "", _one_line(model.get("description", "")), ""]
        out += _table(name, model, defs) if "properties" in model else [f"Type: {_type(model)}"]
    return "\n".join(out) + "\n"


def check() -> bool:
    """Whether docs/spec-reference.md matches what render() produces."""
    return TARGET.exists() and TARGET.read_text() == render()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        if not check():
            print(f"{TARGET} is out of date: run python docs/gen_spec_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
