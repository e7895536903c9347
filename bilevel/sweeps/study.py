"""Sweeps with Optuna: each trial is a `bilevel run` in its own run directory, with the settings a
run cannot differentiate (engine, outer learning rate, inner steps, any spec field) sampled from
the declared space, pruned on the upper loss it reports at each logged outer step, and the study
kept in an Optuna storage (SQLite) so that running the sweep again adds trials to it.

Pruning: the run loop hands every metrics record to a callback, which reports the upper loss to
Optuna (negated when the study maximizes, so that the pruner compares in the study's direction)
and stops the run when the pruner says so; the run then ends with status "stopped_early" and the
trial is recorded as pruned. A trial whose run diverges (NaN guard) is recorded as failed and the
sweep goes on. Ctrl-C stops the sweep: the running trial is recorded as interrupted (Optuna's
state FAIL, with the user attribute ``status: interrupted``, and ``status`` in its trial.json) and
``run_sweep`` raises SweepInterrupted; Optuna's own report of these failures (a traceback each)
is left out, since the sweep says what happened in one line. Trials of a sweep that was killed
are marked failed when the study is next opened (Optuna's heartbeat). ``trial_states`` gives
each trial's state as a person reads it: complete, pruned, diverged, interrupted, failed."""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bilevel.reporting.numbers import format_number
from bilevel.runtime.atomic import atomic_write_json
from bilevel.spec.load import LoadedSpec, spec_from_data
from bilevel.sweeps.space import Dimension, trial_data
from bilevel.sweeps.spec import CategoricalParam, FloatParam, PrunerSpec, SamplerSpec, SweepSpec

__all__ = ["SweepInterrupted", "SweepResult", "run_sweep", "storage_url", "trial_states"]

HEARTBEAT_S = 60


@dataclass
class SweepResult:
    """The study after this invocation, and where its trials ran."""

    study: Any  # optuna.Study
    out: Path
    storage: str


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the trial that was running is recorded as interrupted."""

    def __init__(self, trial: int | None, run_dir: Path | None, finished: int):
        self.trial, self.run_dir, self.finished = trial, run_dir, finished
        where = f"trial {trial} ({run_dir}) recorded as interrupted; " if trial is not None else ""
        super().__init__(f"{where}the study holds {finished} finished trial(s); run the sweep again to add trials")


def trial_states(study: Any) -> dict[int, str]:
    """Trial number -> complete, pruned, running, waiting, failed, or for a failed trial the
    reason this sweep recorded: diverged or interrupted."""
    states = {}
    for trial in study.trials:
        state = trial.state.name.lower()
        if state == "fail":
            state = str(trial.user_attrs.get("status", "failed"))
            state = state if state in ("diverged", "interrupted") else "failed"
        states[trial.number] = state
    return states


class _OwnFailures(logging.Filter):
    """Drops Optuna's log record of a trial failure this sweep reports itself (divergence, Ctrl-C)."""

    def __init__(self, reported: tuple[type[BaseException], ...]):
        super().__init__()
        self.reported = reported

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, self.reported)


@contextmanager
def _quiet_failures(reported: tuple[type[BaseException], ...]) -> Iterator[None]:
    """While a study optimizes: no traceback from Optuna for failures in ``reported``."""
    quiet = _OwnFailures(reported)
    root = logging.getLogger("optuna")
    targets = [root, *root.handlers, logging.getLogger("optuna.study._optimize")]
    for target in targets:
        target.addFilter(quiet)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(quiet)


def storage_url(sweep: SweepSpec, out: Path) -> str:
    """The sweep's storage, or sqlite:///<out>/study.db."""
    return sweep.storage or f"sqlite:///{out / 'study.db'}"


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # optional extra
        raise RuntimeError(f"sweeps need optuna: pip install 'bilevel[sweeps]' (import failed: {exc})") from None
    return optuna


def _storage(optuna: Any, url: str) -> Any:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(("sqlite:", "postgresql:", "mysql:")):
        with warnings.catch_warnings():  # the heartbeat is marked experimental; it is what fails stale trials
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S)
    return url


def _sampler(optuna: Any, spec: SamplerSpec, existing: int) -> Any:
    seed = None if spec.seed is None else spec.seed + existing
    if spec.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(optuna: Any, spec: PrunerSpec, steps: int) -> Any:
    pruners = optuna.pruners
    if spec.kind == "none":
        return pruners.NopPruner()
    if spec.kind == "median":
        return pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if spec.kind == "percentile":
        return pruners.PercentilePruner(spec.percentile, n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if spec.kind == "threshold":
        return pruners.ThresholdPruner(upper=spec.upper, n_warmup_steps=spec.n_warmup_steps)
    return pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1))


def _suggest(trial: Any, dim: Dimension) -> Any:
    param = dim.param
    if isinstance(param, CategoricalParam):
        return trial.suggest_categorical(dim.name, param.choices)
    if isinstance(param, FloatParam):
        return trial.suggest_float(dim.name, param.low, param.high, log=param.log)
    return trial.suggest_int(dim.name, param.low, param.high, step=param.step, log=param.log)


def _objective_value(result: dict[str, Any], objective: str) -> float:
    if objective.startswith("report."):
        key = objective[len("report.") :]
        report = result.get("report") or {}
        if key not in report:
            raise KeyError(f"the run's report has no {key!r} (it has: {', '.join(report) or 'nothing'})")
        return float(report[key])
    return float(result[objective])


def run_sweep(
    sweep: SweepSpec,
    base: LoadedSpec,
    dimensions: list[Dimension],
    out: Path,
    say: Callable[[str], None] = lambda message: None,
) -> SweepResult:
    """Add ``sweep.trials`` trials to the study (created, or loaded from its storage)."""
    optuna = _import_optuna()
    from bilevel.runtime.loop import DivergenceError, run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(sweep, out)
    storage = _storage(optuna, url)
    try:
        existing = len(optuna.load_study(study_name=sweep.study, storage=storage).trials)
    except KeyError:
        existing = 0
    study = optuna.create_study(
        study_name=sweep.study,
        storage=storage,
        load_if_exists=True,
        direction=sweep.direction,
        sampler=_sampler(optuna, sweep.sampler, existing),
        pruner=_pruner(optuna, sweep.pruner, base.spec.run.steps),
    )
    if study.direction.name.lower() != sweep.direction:
        raise ValueError(f"the study {sweep.study!r} in {url} was created to {study.direction.name.lower()};"
                         f" this sweep asks to {sweep.direction} (use another study name)")
    if existing:
        say(f"resuming study {sweep.study!r} ({existing} trials in {url})")
    base_data = base.spec.model_dump(mode="json")
    sign = -1.0 if sweep.direction == "maximize" else 1.0

    running: dict[str, Any] = {}

    def objective(trial: Any) -> float:
        values = {dim.name: _suggest(trial, dim) for dim in dimensions}
        run_dir = out / f"trial-{trial.number:04d}"
        data = trial_data(base_data, dimensions, values)
        loaded = spec_from_data(data, base.file, base.base_dir)
        trial.set_user_attr("run_dir", str(run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"study": sweep.study, "number": trial.number, "params": values,
                "paths": {dim.name: ".".join(dim.path) for dim in dimensions}, "storage": url}
        atomic_write_json(run_dir / "trial.json", info)
        running.update(trial=trial.number, run_dir=run_dir)

        def prune(record: dict[str, Any]) -> str | None:
            loss = record.get("upper_loss")
            if not isinstance(loss, (int, float)) or not math.isfinite(loss):
                return None
            trial.report(sign * loss, record["step"])
            return f"pruned by the sweep's {sweep.pruner.kind} pruner" if trial.should_prune() else None

        try:
            outcome = run(loaded, out=run_dir, progress=False, on_record=prune)
        except DivergenceError as exc:
            trial.set_user_attr("status", "diverged")
            running.clear()
            atomic_write_json(run_dir / "trial.json", {**info, "status": "diverged"})
            say(f"trial {trial.number}: diverged ({exc.step} steps)  {_params_text(values)}")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("status", "interrupted")
            atomic_write_json(run_dir / "trial.json", {**info, "status": "interrupted"})
            raise
        result = outcome.result
        trial.set_user_attr("status", result["status"])
        running.clear()
        if result["status"] == "stopped_early" and str(result.get("stop_reason", "")).startswith("pruned"):
            say(f"trial {trial.number}: pruned at step {result['steps']}  {_params_text(values)}")
            raise optuna.TrialPruned()
        value = _objective_value(result, sweep.objective)
        say(f"trial {trial.number}: {sweep.objective} = {format_number(value)}  {_params_text(values)}")
        return value

    try:
        with _quiet_failures((DivergenceError, KeyboardInterrupt)):
            study.optimize(objective, n_trials=sweep.trials, catch=(DivergenceError,))
    except KeyboardInterrupt:
        finished = sum(1 for state in trial_states(study).values() if state in ("complete", "pruned"))
        raise SweepInterrupted(running.get("trial"), running.get("run_dir"), finished) from None
    return SweepResult(study, out, url)


def _params_text(values: dict[str, Any]) -> str:
    """``engine=implicit  outer_lr=0.0316228``: a trial's parameters as a person reads them."""
    return "  ".join(f"{name}={format_number(value)}" for name, value in values.items())
