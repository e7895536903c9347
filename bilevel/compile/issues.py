"""What compiling a spec found wrong, collected so that one pass reports every problem, and the
resolution of references to user code with its errors at their dotted paths."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from bilevel.refs import RefError, resolve_ref
from bilevel.spec.errors import SpecError, SpecIssue, SpecSource, VariableError
from bilevel.spec.load import describe_error

__all__ = ["IssueLog"]


class IssueLog:
    """The issues found so far in one spec, and the checks that add to them."""

    def __init__(self, source: SpecSource, base_dir: Path):
        self.source = source
        self.base_dir = base_dir
        self.issues: list[SpecIssue] = []

    def fail(self, path: str, message: str) -> None:
        self.issues.append(self.source.issue(path, message))

    def raise_any(self) -> None:
        """Raise a SpecError with every issue found, if any."""
        if self.issues:
            raise SpecError(self.issues)

    def fail_call(self, exc: Exception, ref: str, path: str, kwargs_path: str, argument: str | None = None) -> None:
        """Report an exception raised by user code called with keyword arguments from the spec.
        A pydantic ValidationError (user code validating its arguments, e.g. with
        ``pydantic.validate_call``, or an argument checked against its annotation) is reported at
        the dotted path of each offending argument; ``argument`` names the one argument whose value
        was validated (then the paths lie inside it)."""
        if isinstance(exc, ValidationError):
            for error in exc.errors(include_url=False):
                where = ".".join([kwargs_path, *(str(part) for part in error["loc"])])
                unknown = error["type"] in ("extra_forbidden", "unexpected_keyword_argument")
                if argument is None:
                    self.fail(where, f"unknown argument of {ref} (check the spelling)" if unknown else describe_error(error))
                else:
                    self.fail(where, f"unknown field of the {argument} argument of {ref} (check the spelling)" if unknown
                              else f"{describe_error(error)} (the {argument} argument of {ref})")
            return
        self.fail(path, f"calling {ref} raised {type(exc).__name__}: {exc}")

    def fail_variable(self, levels: Mapping[str, Any], exc: VariableError) -> None:
        """A VariableError from user code, reported at the variable's dotted path."""
        for level in levels.values():
            if exc.variable in level.tensors or exc.variable in level.modules:
                self.fail(f"levels.{level.name}.variables.{exc.variable}.{exc.field}", exc.message)
                return
        self.fail("levels", str(exc))

    def ref(self, ref: str, path: str, want_callable: bool = True) -> Any:
        """The object a reference names, or None (with an issue at ``path``)."""
        try:
            obj = resolve_ref(ref, self.base_dir)
        except RefError as exc:
            self.fail(path, str(exc))
            return None
        if want_callable and not callable(obj):
            self.fail(path, f"{ref!r} is a {type(obj).__name__}, expected a callable")
            return None
        return obj

    def bind(self, fn: Callable[..., Any], n_args: int, kwargs: dict[str, Any], path: str, what: str) -> Any:
        """fn with the kwargs bound, after checking that it accepts n_args positional arguments
        plus kwargs; None (with an issue) when it does not."""
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return functools.partial(fn, **kwargs) if kwargs else fn
        try:
            signature.bind(*([None] * n_args), **kwargs)
        except TypeError as exc:
            extra = f", **{{{', '.join(kwargs)}}}" if kwargs else ""
            self.fail(path, f"{fn.__qualname__}{signature} does not match the expected signature {what}{extra}: {exc}")
            return None
        return functools.partial(fn, **kwargs) if kwargs else fn

    def check_annotated_kwargs(self, fn: Callable[..., Any], kwargs: Mapping[str, Any], ref: str, kwargs_path: str) -> None:
        """Validate keyword arguments from the spec against fn's type annotations, for functions that
        ``bilevel validate`` does not call (reports, monitors): ``models: int`` refuses "three", and a
        parameter annotated with a pydantic model validates a mapping field by field, each error at
        its dotted path under ``kwargs_path``. The function still receives the values as written;
        annotations pydantic cannot build a validator for are not checked."""
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotations: nothing to check against
            return
        for name, value in kwargs.items():
            if name not in hints:
                continue
            try:
                adapter = TypeAdapter(hints[name])
            except (PydanticSchemaGenerationError, TypeError, NameError):
                continue
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                self.fail_call(exc, ref, f"{kwargs_path}.{name}", f"{kwargs_path}.{name}", argument=name)
