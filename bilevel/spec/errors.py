"""SpecError: every problem with a spec, as (file, dotted path, what was expected) lines."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SpecError", "SpecIssue", "SpecSource", "VariableError"]


@dataclass(frozen=True)
class SpecIssue:
    """One problem with a spec: where it is and what was expected."""

    file: str
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path or '(top level)'}: {self.message}"


@dataclass(frozen=True)
class SpecSource:
    """Where a spec came from, for messages: its file and the line of each dotted path."""

    file: str = "<python>"
    lines: dict[tuple[str, ...], int] = field(default_factory=dict, compare=False)

    def issue(self, path: str, message: str) -> SpecIssue:
        """A SpecIssue at a dotted path of this spec, with its line number when known."""
        return SpecIssue(self.file, path, message, self.lines.get(tuple(path.split("."))))

    def error(self, path: str, message: str) -> "SpecError":
        return SpecError([self.issue(path, message)])


class SpecError(Exception):
    """A spec that cannot be loaded, validated or compiled. ``issues`` holds one entry per error."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def single(cls, file: str, path: str, message: str) -> "SpecError":
        return cls([SpecIssue(file, path, message)])


class VariableError(ValueError):
    """Raised by user code (an objective, a closed-form solver) when a declared variable does not
    fit the problem, e.g. synthetic images whose shape differs from the data's. When it happens
    while a spec is compiled, the error is reported at the variable's own dotted path,
    ``levels.<level>.variables.<variable>.<field>``, instead of at the objective that noticed it."""

    def __init__(self, variable: str, message: str, field: str = "shape"):
        self.variable = variable
        self.field = field
        self.message = message
        super().__init__(f"variable {variable!r}: {message}")
