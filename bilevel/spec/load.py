"""Load specs from YAML/JSON files (safe YAML only) and turn validation errors into SpecIssues."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bilevel.refs import RefError, allowed_imports, check_allowed, import_module_ref
from bilevel.spec.errors import SpecError, SpecIssue, SpecSource
from bilevel.spec.problem import BilevelSpec
from bilevel.spec.reading import non_finite_issues, read_data
from bilevel.spec.references import spec_references

__all__ = ["LoadedSpec", "apply_overrides", "describe_error", "load_spec", "read_spec_file", "spec_from_data", "validation_issues"]


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from: the file (for messages) and the directory that
    relative "file.py:attr" references are resolved against."""

    spec: BilevelSpec
    file: str = "<python>"
    base_dir: Path = field(default_factory=Path.cwd)
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    @property
    def source(self) -> SpecSource:
        """The file and lines, for messages about this spec after it is compiled."""
        return SpecSource(self.file, self.lines)

    def issue(self, path: str, message: str) -> SpecIssue:
        """A SpecIssue at a dotted path of this spec, with its line number when known."""
        return self.source.issue(path, message)

    def error(self, path: str, message: str) -> SpecError:
        return SpecError([self.issue(path, message)])


def _read(path: Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    return read_data(path)


# union members chosen when "kind" is omitted
_DEFAULT_TAG = {"tensor": "tensor", "box": "box"}


def _strip_union_tags(loc: tuple[Any, ...], data: Any, tags: frozenset[str] = frozenset()) -> list[str]:
    """Pydantic inserts the discriminator's value into the location of tagged-union errors;
    drop those (and the extra union ``tags`` of a model whose kind is inferred) so the path is
    the one the user wrote."""
    parts: list[str] = []
    node = data
    for item in loc:
        key = str(item)
        if isinstance(node, dict):
            if item in node:
                node = node[item]
            elif item in tags or node.get("kind", _DEFAULT_TAG.get(item)) == item:
                continue
            else:
                node = None
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        else:
            node = None
        parts.append(key)
    return parts


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as the message a user reads (what was expected, and what was given)."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; `bilevel schema` lists the fields)"
    if kind == "missing":
        return "required field is missing"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind == "string_pattern_mismatch" and ":" in str(error.get("ctx", {}).get("pattern", "")):
        message = 'expected a reference "package.module:attr" or "path/to/file.py:attr"'
    if kind == "union_tag_invalid":
        message = f"unknown kind; expected one of {error.get('ctx', {}).get('expected_tags', '')}"
    if kind not in ("value_error", "assertion_error") and "input" in error:
        shown = repr(error["input"])
        if len(shown) <= 60 and not isinstance(error["input"], dict):
            message += f" (got {shown})"
    return message


def _register_builtin_engines() -> None:
    """Import the engine registry (lazily: it imports the spec models), so that ``engine.kind``
    accepts every built-in engine even when only ``bilevel.spec`` was imported."""
    import bilevel.engines  # noqa: F401  (registers the engines' configs with BilevelSpec)


def spec_from_data(
    data: Any,
    file: str = "<python>",
    base_dir: Path | None = None,
    lines: dict[tuple[str, ...], int] | None = None,
) -> LoadedSpec:
    """Validate plain data (as parsed from YAML/JSON) into a LoadedSpec, or raise SpecError."""
    lines = lines or {}
    non_finite = non_finite_issues(data, file, lines)
    if non_finite:
        raise SpecError(non_finite)
    _check_allowed_imports(data, file, base_dir, lines)
    _register_builtin_engines()
    _import_plugins(data, file, base_dir, lines)
    try:
        spec = BilevelSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_issues(exc, data, file, lines)) from None
    return LoadedSpec(spec, file, base_dir or Path.cwd(), lines)


def _check_allowed_imports(data: Any, file: str, base_dir: Path | None, lines: dict[tuple[str, ...], int]) -> None:
    """Under an allow list (``bilevel.refs``), every reference it excludes, before any is imported."""
    if allowed_imports() is None:
        return
    issues = []
    for path, ref in spec_references(data):
        try:
            check_allowed(ref.partition(":")[0], base_dir)
        except RefError as exc:
            issues.append(SpecIssue(file, path, str(exc), lines.get(tuple(path.split(".")))))
    if issues:
        raise SpecError(issues)


def _import_plugins(data: Any, file: str, base_dir: Path | None, lines: dict[tuple[str, ...], int]) -> None:
    """Import the modules a spec's ``plugins`` names before validating it, so that the engines
    they register are part of the engine union the spec is validated against."""
    plugins = data.get("plugins") if isinstance(data, dict) else None
    if not isinstance(plugins, list):
        return  # absent, or of the wrong type: validation says so
    issues = []
    for index, ref in enumerate(plugins):
        if not isinstance(ref, str):
            continue
        try:
            import_module_ref(ref, base_dir)
        except RefError as exc:
            issues.append(SpecIssue(file, f"plugins.{index}", str(exc), lines.get(("plugins", str(index)))))
    if issues:
        raise SpecError(issues)


def validation_issues(
    exc: ValidationError,
    data: Any,
    file: str,
    lines: dict[tuple[str, ...], int] | None = None,
    prefix: tuple[str, ...] = (),
    tags: frozenset[str] = frozenset(),
) -> list[SpecIssue]:
    """One SpecIssue per pydantic error, at the dotted path the user wrote (``prefix`` first: the
    path of ``data`` inside its file), with the line number when known."""
    lines = lines or {}
    issues = []
    for error in exc.errors():
        parts = [*prefix, *_strip_union_tags(error["loc"], data, tags)]
        line = None
        for cut in range(len(parts), -1, -1):
            line = lines.get(tuple(parts[:cut]))
            if line is not None:
                break
        issues.append(SpecIssue(file, ".".join(parts), describe_error(error), line))
    return issues


def read_spec_file(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML/JSON file's top-level mapping and the line of each dotted path (safe YAML only)."""
    return _read(Path(path))


def apply_overrides(data: dict[str, Any], overrides: list[str], file: str = "<override>") -> dict[str, Any]:
    """Apply "dotted.path=value" overrides (values parsed as YAML) to spec data, returning a copy.

    A YAML anchor declares a value once: its aliases load as one shared mapping, which the copy
    keeps shared. An override of a field inside it (``levels.lower.data.kwargs.seed=1`` where
    ``kwargs: *data``) therefore changes every alias, as editing the anchor would; an override of
    the aliased node itself (``levels.lower.data.kwargs={...}``) replaces that one place only."""
    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise SpecError.single(file, override, "expected an override of the form dotted.path=value")
        path, raw = override.split("=", 1)
        keys = path.strip().split(".")
        if not path.strip() or any(not key for key in keys):
            raise SpecError.single(file, override, "expected an override of the form dotted.path=value, with a"
                                                   f" non-empty dotted path (got {path.strip()!r})")
        node = data
        for key in keys[:-1]:
            if not isinstance(node, dict):
                raise SpecError.single(file, path, f"cannot descend into {key!r}: not a mapping")
            node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SpecError.single(file, path, "cannot set a field on a value that is not a mapping")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise SpecError.single(file, path.strip(), f"cannot read the value {raw!r} of --set {override!r} as YAML:"
                                                       f" {problem}") from None
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None) -> LoadedSpec:
    """Load and validate a spec file (.yaml, .yml or .json), raising SpecError on any problem."""
    path = Path(path)
    data, lines = _read(path)
    if overrides:
        data = apply_overrides(data, overrides, str(path))
    return spec_from_data(data, str(path), path.resolve().parent, lines)
