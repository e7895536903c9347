"""SpecError: every problem with a spec, as (file, dotted path, what was expected) lines."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpecError", "SpecIssue"]


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


class SpecError(Exception):
    """A spec that cannot be loaded, validated or compiled. ``issues`` holds one entry per error."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def single(cls, file: str, path: str, message: str) -> "SpecError":
        return cls([SpecIssue(file, path, message)])
