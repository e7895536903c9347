"""Sweeps with Optuna over the settings a bilevel run cannot differentiate (`bilevel sweep`).

``prepare_sweep`` reads the sweep (a ``sweep:`` section in its own YAML file, or the defaults),
loads the bilevel spec it names and checks the search space against it; ``run_sweep`` runs the
trials (bilevel.sweeps.study). ``hyperparameter_space`` and ``suggest_hyperparameters`` give a
spec's declared hyperparameters to a search of your own (bilevel.sweeps.hyperparameters)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bilevel.spec.errors import SpecError
from bilevel.spec.load import LoadedSpec, load_spec, read_spec_file, validation_issues
from bilevel.sweeps.hyperparameters import draw_hyperparameters, hyperparameter_space, suggest_hyperparameters
from bilevel.sweeps.space import Dimension, default_space, resolve_space, trial_data
from bilevel.sweeps.spec import PARAM_KINDS, SweepSpec
from bilevel.sweeps.study import SweepInterrupted, SweepResult, run_sweep, storage_url, trial_states

__all__ = [
    "Dimension",
    "SweepInterrupted",
    "SweepPlan",
    "SweepResult",
    "SweepSpec",
    "default_space",
    "draw_hyperparameters",
    "hyperparameter_space",
    "prepare_sweep",
    "resolve_space",
    "run_sweep",
    "storage_url",
    "suggest_hyperparameters",
    "trial_data",
    "trial_states",
]


@dataclass
class SweepPlan:
    """A validated sweep: its settings, the base spec, the dimensions searched, the trials' directory."""

    sweep: SweepSpec
    base: LoadedSpec
    dimensions: list[Dimension]
    out: Path


def _sweep_section(path: Path) -> tuple[SweepSpec, dict[tuple[str, ...], int]]:
    data, lines = read_spec_file(path)
    section = data.get("sweep")
    if not isinstance(section, dict) or set(data) != {"sweep"}:
        raise SpecError.single(str(path), "sweep", "expected a file with a single top-level `sweep:` mapping"
                               " (see docs/howto/sweeps.md)")
    try:
        return SweepSpec.model_validate(section), lines
    except ValidationError as exc:
        raise SpecError(validation_issues(exc, section, str(path), lines, ("sweep",), PARAM_KINDS)) from None


def _is_sweep_file(path: Path) -> bool:
    if not path.is_file():
        return False
    data, _ = read_spec_file(path)
    return "sweep" in data


def _load_base(reference: str, relative_to: Path | None, overrides: list[str]) -> LoadedSpec:
    from bilevel.presets import find_preset, list_presets

    path = Path(reference)
    if relative_to is not None and not path.is_absolute() and (relative_to / path).exists():
        path = relative_to / path
    if not path.exists():
        preset = find_preset(reference)
        if preset is None:
            raise SpecError.single(reference, "", f"no such file, and no preset of that name (presets: {', '.join(list_presets())})")
        path = preset
    return load_spec(path, overrides)


def prepare_sweep(
    target: str,
    space_file: str | Path | None = None,
    overrides: list[str] | None = None,
    **settings: Any,
) -> SweepPlan:
    """Read and validate a sweep.

    ``target`` is a sweep file (a YAML file with a ``sweep:`` section naming its spec) or a
    bilevel spec / preset, whose sweep settings then come from ``space_file`` (or the defaults).
    ``settings`` (trials, study, storage, out) override the sweep file's; ``overrides`` are
    `--set` overrides of the spec for every trial, after the sweep file's ``set``."""
    target_path = Path(target)
    sweep_file: Path | None = None
    if _is_sweep_file(target_path):
        sweep_file, spec_ref = target_path, None
    else:
        sweep_file, spec_ref = (Path(space_file) if space_file is not None else None), target
    sweep, lines = _sweep_section(sweep_file) if sweep_file is not None else (SweepSpec(), {})
    updates = {k: v for k, v in settings.items() if v is not None}
    if updates:
        sweep = SweepSpec.model_validate({**sweep.model_dump(), **updates})
    if spec_ref is None:
        if sweep.spec is None:
            raise SpecError.single(str(sweep_file), "sweep.spec", "no bilevel spec to sweep over: set sweep.spec"
                                   " or give the spec on the command line (bilevel sweep SPEC --space SWEEP)")
        spec_ref, relative = sweep.spec, sweep_file.parent if sweep_file is not None else None
    else:
        relative = None
    base = _load_base(spec_ref, relative, [*sweep.set, *(overrides or [])])
    file = str(sweep_file) if sweep_file is not None else "<sweep defaults>"
    dimensions = resolve_space(sweep, base, file, lines, ("sweep",))
    out = Path(sweep.out or f"runs/sweeps/{sweep.study}")
    return SweepPlan(sweep, base, dimensions, out)
