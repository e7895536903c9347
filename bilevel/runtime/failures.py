"""User code that fails during a run: which level's objective (or which user function) raised,
at which outer step, with the exception's own message, and the last good checkpoint kept. The
command exits with ``EXIT_CODE`` (4).

The culprit is read from the traceback: the innermost package frame that holds the ``level``
being evaluated names the level, and the innermost frame outside the package (and outside torch
and the standard library) is the user's line. An objective whose value has no gradient path to
the variables (a constant, ``.detach()``, ``.item()``) fails inside autograd, after the objective
has returned: each objective is then evaluated once more at the current variables to name those
whose value does not depend on them."""

from __future__ import annotations

import os
import sysconfig
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

__all__ = ["EXIT_CODE", "UserCodeFailure", "user_code_failure"]

EXIT_CODE = 4
_PACKAGE = str(Path(__file__).resolve().parents[1])
_OTHERS = (str(Path(torch.__file__).resolve().parent), sysconfig.get_paths()["stdlib"])
_NO_PATH = ("does not require grad", "appears to not have been used in the graph")


class UserCodeFailure(RuntimeError):
    """User code raised during the run (see the module docstring)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint
        self.exit_code = EXIT_CODE


def _frames(tb: TracebackType | None) -> list[Any]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _is_user(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not (path.startswith(_PACKAGE) or any(path.startswith(other) for other in _OTHERS) or filename.startswith("<"))


def _level_of(frames: list[Any]) -> str | None:
    for frame in reversed(frames):
        if not os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
            continue
        level = frame.f_locals.get("level")
        if hasattr(level, "name") and hasattr(level, "objective"):
            return level.name
    return None


def _without_path(problem: Any, session: Any) -> list[str]:
    """The levels whose objective, at the session's variables, does not depend on them (depth 2)."""
    if getattr(problem, "depth", None) != 2 or getattr(problem, "stacked", None) is not None:
        return []
    found = []
    try:
        x = tuple(p.detach().requires_grad_(True) for p in session.x)
        y = tuple(p.detach().requires_grad_(True) for p in session.state.lower)
        with torch.enable_grad():
            for k, level in enumerate(problem.chain):
                batch = None if level.data is None else level.data.full
                value = problem.objective(k, [x, y], batch)
                if not value.requires_grad:
                    found.append(level.name)
    except Exception:  # a diagnosis only: the original error is what gets reported
        return found
    return found


def user_code_failure(exc: BaseException, problem: Any, session: Any, step: int, checkpoint: Path | None) -> UserCodeFailure | None:
    """The failure to report for ``exc`` raised at outer step ``step`` (1-based), or None when the
    exception did not come from user code (an internal error, reported as such)."""
    level = _level_of(_frames(exc.__traceback__))
    user = [entry for entry in traceback.extract_tb(exc.__traceback__) if _is_user(entry.filename)]
    what = f"{type(exc).__name__}: {exc}"
    keep = (f" The last good checkpoint is {checkpoint} (resume with --resume once fixed)." if checkpoint is not None
            else " No checkpoint was written yet.")
    if isinstance(exc, RuntimeError) and any(text in str(exc) for text in _NO_PATH):
        levels = _without_path(problem, session)
        names = " and ".join(f"levels.{name}.objective" for name in levels) or "an objective"
        message = (f"outer step {step}: {names} returned a value with no gradient path to the variables ({what});"
                   " compute it from the variables it receives (a constant, .detach(), .item() or torch.tensor(...)"
                   " of a result cuts the path).")
        return UserCodeFailure(message + keep, step, checkpoint)
    if level is None and not user:
        return None
    where = f" at {user[-1].filename}:{user[-1].lineno} in {user[-1].name}" if user else ""
    culprit = f"levels.{level}.objective" if level is not None else "user code"
    return UserCodeFailure(f"outer step {step}: {culprit} raised {what}{where}.{keep}", step, checkpoint)
