"""Resolve spec references to user code: "package.module:attr" or "path/to/file.py:attr"."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["RefError", "import_module_ref", "resolve_ref"]


class RefError(Exception):
    """A reference that does not resolve; the message says why, in one line."""


def _load_file_module(path: Path) -> Any:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"bilevel_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RefError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # user code: report, never crash
        del sys.modules[name]
        raise RefError(f"importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def import_module_ref(module_part: str, base_dir: Path | None = None) -> Any:
    """The module a reference's module part names: "path/to/file.py" (relative to ``base_dir``,
    the spec's folder) or "package.module"; importing it runs its top-level code (a plugin
    registers its engines so)."""
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        path = path.resolve()
        if not path.is_file():
            raise RefError(f"file {module_part!r} not found (looked at {path})")
        return _load_file_module(path)
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        raise RefError(f"cannot import module {module_part!r}: {exc}") from exc
    except Exception as exc:  # user code: report, never crash
        raise RefError(f"importing module {module_part!r} raised {type(exc).__name__}: {exc}") from exc


def resolve_ref(ref: str, base_dir: Path | None = None) -> Any:
    """The object a reference names. File paths are relative to ``base_dir`` (the spec's folder)."""
    module_part, _, attr_path = ref.partition(":")
    if not attr_path:
        raise RefError(f'{ref!r} is not a reference; expected "package.module:attr" or "file.py:attr"')
    obj: Any = import_module_ref(module_part, base_dir)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RefError(f"{module_part!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj
