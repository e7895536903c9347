"""Named presets: YAML specs shipped with the problem families (``bilevel problems`` lists them)."""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["DEFAULT_PRESET", "find_preset", "list_presets"]

DEFAULT_PRESET = "hyperclean/digits"
_ROOT = Path(__file__).resolve().parent.parent / "problems"


def list_presets() -> dict[str, dict[str, str]]:
    """preset name ("family/preset") -> {"path", "description"}."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted(_ROOT.glob("*/*.yaml")):
        name = f"{path.parent.name}/{path.stem}"
        text = path.read_text()
        header = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("# ").strip())
        comment = " ".join(header)
        try:
            description = comment or (yaml.safe_load(text) or {}).get("name", "")
        except yaml.YAMLError:
            description = comment
        out[name] = {"path": str(path), "description": description}
    return out


def find_preset(name: str) -> Path | None:
    """The path of preset ``name`` ("family/preset", or just "family" for its only/first preset)."""
    presets = list_presets()
    if name in presets:
        return Path(presets[name]["path"])
    family = [p for n, p in presets.items() if n.split("/")[0] == name]
    return Path(family[0]["path"]) if family else None
