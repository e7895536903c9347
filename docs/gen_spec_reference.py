"""Generate docs/spec-reference.md from the JSON Schema of the spec (the schema is the source of
truth; every field's description is its docstring in bilevel/spec/).

    python docs/gen_spec_reference.py           # rewrite docs/spec-reference.md
    python docs/gen_spec_reference.py --check   # exit 1 if the file is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bilevel.spec import spec_schema  # noqa: E402

TARGET = ROOT / "docs" / "spec-reference.md"


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        name = prop["$ref"].split("/")[-1]
        return f"[{name}](#{name.lower()})"
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return " or ".join(_type(p) for p in prop[key])
    kind = prop.get("type", "any")
    if kind == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_type(p) for p in prop["prefixItems"]) + "]"
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop and isinstance(prop["additionalProperties"], dict):
        return f"mapping name -> {_type(prop['additionalProperties'])}"
    bounds = []
    for key, symbol in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in prop:
            bounds.append(f"{symbol} {prop[key]}")
    if "pattern" in prop:
        return "reference `module:attr` / `file.py:attr`" if ":" in prop["pattern"] else f"{kind} matching `{prop['pattern']}`"
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _table(model: dict[str, Any]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    required = set(model.get("required", []))
    for name, prop in model.get("properties", {}).items():
        default = "required" if name in required else f"`{json.dumps(prop.get('default'))}`" if "default" in prop else ""
        description = " ".join(prop.get("description", "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {_type(prop)} | {default} | {description} |")
    return lines


def render() -> str:
    """The whole reference page as markdown."""
    schema = spec_schema()
    out = [
        "# Spec reference",
        "",
        "Generated from the JSON Schema by `python docs/gen_spec_reference.py` (do not edit by hand;",
        "`bilevel schema` prints the schema itself). A spec file is YAML or JSON; unknown fields are errors.",
        "",
        "## BilevelSpec (the top level)",
        "",
        " ".join(schema.get("description", "").split()),
        "",
        *_table(schema),
    ]
    for name, model in sorted(schema.get("$defs", {}).items()):
        out += ["", f"## {name}", "", " ".join(model.get("description", "").split()), ""]
        out += _table(model) if "properties" in model else [f"Type: {_type(model)}"]
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python docs/gen_spec_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
