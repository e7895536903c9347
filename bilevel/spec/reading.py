"""Reading a spec file into plain data and the line of each dotted path, refusing what a parser
would accept but a user did not mean: duplicate keys (the last one would silently win),
non-finite numbers, files that are not text (a checkpoint given as the spec), nesting too deep to
read, and YAML aliases that expand into more values than any spec has (an "alias bomb").

YAML is composed once with PyYAML's safe loader (no Python tags) into a node graph; the data are
built from that graph, each node once (aliases share their anchor's value, as ``yaml.safe_load``
does), and the line index records each node's first path only, so neither grows with the number
of alias paths. JSON is parsed by the json module (duplicates caught by its pair hook); its lines
come from the same YAML composition when the text also reads as YAML."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bilevel.spec.errors import SpecError, SpecIssue

__all__ = ["MAX_EXPANDED_VALUES", "non_finite_issues", "read_data"]

MAX_EXPANDED_VALUES = 1_000_000
_MAX_REPORTED = 100  # non-finite numbers reported at most (their paths through aliases can be many)
"""Values a spec may expand to through aliases (a spec has hundreds; an alias bomb billions)."""
_BINARY_MAGIC = {b"PK\x03\x04": "a zip archive (a torch checkpoint such as checkpoint.pt?)", b"\x80\x02": "a pickle",
                 b"\x89PNG": "a PNG image", b"\x7fELF": "an executable"}

class Lines(dict):
    """The line of each dotted path (a tuple of keys). A path through a YAML alias is looked up
    through the anchor's own path (``aliases``: alias path -> the first path of its node), so the
    index holds each node once and still answers every path the data can be reached by."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.aliases: dict[tuple[str, ...], tuple[str, ...]] = {}

    def get(self, path: Any, default: Any = None) -> Any:
        for _ in range(64):  # each step leaves an alias for its anchor; a recursive alias stops here
            if path in self:
                return self[path]
            prefix = next((path[:n] for n in range(len(path) - 1, 0, -1) if path[:n] in self.aliases), None)
            if prefix is None:
                return default
            path = (*self.aliases[prefix], *path[len(prefix):])
        return default


def _text(path: Path) -> str:
    file = str(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise SpecError.single(file, "", "is a directory, not a spec file (expected a .yaml, .yml or .json file)") from None
    except OSError as exc:
        raise SpecError.single(file, "", f"cannot read the spec file: {exc.strerror or exc}") from None
    for magic, what in _BINARY_MAGIC.items():
        if raw.startswith(magic):
            raise SpecError.single(file, "", f"is {what}, not a spec: expected a YAML or JSON text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError.single(file, "", f"is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r});"
                                          " expected a YAML or JSON text file") from None
    if "\x00" in text:
        raise SpecError.single(file, "", "contains NUL bytes: expected a YAML or JSON text file, not a binary file")
    return text


def _key(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else "<complex key>"


class _Builder:
    """Plain data from a composed node graph, each node built once; duplicate keys, the line of
    each node's first path and the expanded size (alias paths counted) along the way."""

    def __init__(self, file: str):
        self.file = file
        self.constructor = yaml.SafeLoader("")
        self.built: dict[int, Any] = {}
        self.sizes: dict[int, int] = {}
        self.lines = Lines()
        self.first_path: dict[int, tuple[str, ...]] = {}
        self.issues: list[SpecIssue] = []

    def size(self, node: yaml.Node) -> int:
        """Values under ``node`` counting every alias path (memoized per node: linear time)."""
        key = id(node)
        if key not in self.sizes:
            self.sizes[key] = 1  # a recursive alias counts once
            if isinstance(node, yaml.MappingNode):
                self.sizes[key] = 1 + sum(self.size(v) for _, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                self.sizes[key] = 1 + sum(self.size(v) for v in node.value)
        return self.sizes[key]

    def build(self, node: yaml.Node, path: tuple[str, ...]) -> Any:
        key = id(node)
        if key in self.built:
            self.lines.setdefault(path, node.start_mark.line + 1)
            if self.first_path[key] != path:
                self.lines.aliases[path] = self.first_path[key]
            return self.built[key]
        self.lines[path] = node.start_mark.line + 1
        self.first_path[key] = path
        if isinstance(node, yaml.MappingNode):
            explicit = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
            self.constructor.flatten_mapping(node)  # merge keys (<<: *anchor): merged pairs first, overridable
            out: dict[Any, Any] = {}
            self.built[key] = out
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                name = self.constructor.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else _key(key_node)
                line = key_node.start_mark.line + 1
                if id(key_node) not in explicit:  # from a merge: an explicit key of the same name overrides it
                    out[name] = self.build(value_node, (*path, str(name)))
                    continue
                if name in first:
                    where = ".".join((*path, str(name)))
                    self.issues.append(SpecIssue(self.file, where, f"duplicate key {str(name)!r} (lines {first[name]} and"
                                                 f" {line}); each key may appear once in a mapping", line))
                    continue
                first[name] = line
                out[name] = self.build(value_node, (*path, str(name)))
            return out
        if isinstance(node, yaml.SequenceNode):
            items: list[Any] = []
            self.built[key] = items
            items.extend(self.build(v, (*path, str(i))) for i, v in enumerate(node.value))
            return items
        value = self.constructor.construct_object(node, deep=True)
        self.built[key] = value
        return value


def _compose(text: str, file: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([SpecIssue(file, "", f"invalid YAML: {problem}", line)]) from None


def _yaml(text: str, file: str) -> tuple[Any, Lines]:
    node = _compose(text, file)
    if node is None:
        return None, {}
    builder = _Builder(file)
    expanded = builder.size(node)
    if expanded > MAX_EXPANDED_VALUES:
        raise SpecError.single(file, "", f"expands to {expanded} values through YAML aliases (more than"
                                         f" {MAX_EXPANDED_VALUES}); a spec this large is refused")
    try:
        data = builder.build(node, ())
    except yaml.YAMLError as exc:  # a tag the safe loader does not know (!!python/object, ...)
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise SpecError([SpecIssue(file, "", f"invalid YAML: {getattr(exc, 'problem', None) or exc}", line)]) from None
    if builder.issues:
        raise SpecError(builder.issues)
    return data, builder.lines


def _json(text: str, file: str) -> tuple[Any, Lines]:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in items:
            if name in out:
                duplicates.append(name)
            out[name] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise SpecError([SpecIssue(file, "", f"invalid JSON: {exc.msg}", exc.lineno)]) from None
    try:  # JSON text reads as YAML (flow style): its composition gives the lines and the duplicates' paths
        _, lines = _yaml(text, file)
    except SpecError as exc:
        if duplicates and any("duplicate key" in issue.message for issue in exc.issues):
            raise
        lines = Lines()
    if duplicates:
        raise SpecError.single(file, "", f"duplicate key {duplicates[0]!r}; each key may appear once in an object")
    return data, lines


def read_data(path: Path) -> tuple[dict[str, Any], Lines]:
    """A spec file's top-level mapping and the line of each dotted path (see the module docstring)."""
    file = str(path)
    text = _text(path)
    try:
        data, lines = _json(text, file) if path.suffix == ".json" else _yaml(text, file)
    except RecursionError:
        raise SpecError.single(file, "", "is nested too deeply to read (thousands of levels); a spec is a few levels deep") from None
    if not isinstance(data, dict):
        raise SpecError.single(file, "", f"expected a mapping at the top level, got {type(data).__name__}")
    return data, lines


def _walk(data: Any, path: tuple[str, ...], ancestors: set[int]) -> Iterator[tuple[tuple[str, ...], float]]:
    """Every non-finite number with its path; a mapping reused through an alias is walked at each of
    its paths (each place reports at its own dotted path), a cycle (Python data) only once."""
    if isinstance(data, float):
        if not math.isfinite(data):
            yield path, data
    elif isinstance(data, (dict, list)):
        if id(data) in ancestors:
            return
        ancestors.add(id(data))
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, value in items:
            yield from _walk(value, (*path, str(key)), ancestors)
        ancestors.discard(id(data))


def non_finite_issues(data: Any, file: str, lines: Lines) -> list[SpecIssue]:
    """An issue at every non-finite number (.inf, -.inf, .nan) in spec data: no field takes one."""
    found = itertools.islice(_walk(data, (), set()), _MAX_REPORTED)
    return [SpecIssue(file, ".".join(path), f"{value} is not a finite number; expected a finite number", lines.get(path))
            for path, value in found]
