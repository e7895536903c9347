"""Resolve spec references to user code: "package.module:attr" or "path/to/file.py:attr".

Trust model: a spec is code. Its references name callables that are imported and called while
the spec is validated (the dry run evaluates every objective), so a spec from someone else can
run anything its references reach, ``os:system`` included. ``BILEVEL_ALLOW_IMPORTS`` (the
command line's ``--allow-imports``) restricts what may be imported: a comma-separated list of
packages (each with its submodules); files are then allowed only inside the spec's own folder.
``bilevel`` itself is always allowed. Every import goes through ``import_module_ref``, which
enforces the list before importing anything."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["ALLOW_IMPORTS_ENV", "RefError", "allowed_imports", "check_allowed", "import_module_ref", "resolve_ref",
           "set_allowed_imports"]

ALLOW_IMPORTS_ENV = "BILEVEL_ALLOW_IMPORTS"


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


_command_line: dict[str, str | None] = {"allow": None}  # --allow-imports of the command running now


def set_allowed_imports(value: str | None) -> None:
    """The command line's --allow-imports (None: not given; the environment variable decides)."""
    _command_line["allow"] = value


def allowed_imports() -> tuple[str, ...] | None:
    """The packages references may import (--allow-imports, else ``BILEVEL_ALLOW_IMPORTS``), or
    None: no restriction."""
    value = _command_line["allow"] if _command_line["allow"] is not None else os.environ.get(ALLOW_IMPORTS_ENV)
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def check_allowed(module_part: str, base_dir: Path | None = None) -> None:
    """A RefError when the allow list (``allowed_imports``) excludes this module or file."""
    allowed = allowed_imports()
    if allowed is None:
        return
    folder = (base_dir or Path.cwd()).resolve()
    if module_part.endswith(".py"):
        path = Path(module_part)
        path = (path if path.is_absolute() else folder / path).resolve()
        if not path.is_relative_to(folder):
            raise RefError(f"file {module_part!r} is outside the spec's folder {folder}, which is all --allow-imports"
                           " permits for files")
        return
    if not any(module_part == name or module_part.startswith(name + ".") for name in (*allowed, "bilevel")):
        listed = ", ".join(allowed) or "no packages"
        raise RefError(f"module {module_part!r} is not allowed by --allow-imports ({listed}; and files in the spec's"
                       " folder); add its package to the list if you trust it")


def import_module_ref(module_part: str, base_dir: Path | None = None) -> Any:
    """The module a reference's module part names: "path/to/file.py" (relative to ``base_dir``,
    the spec's folder) or "package.module"; importing it runs its top-level code (a plugin
    registers its engines so). The allow list is checked first (``check_allowed``)."""
    check_allowed(module_part, base_dir)
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
