"""Experiment trackers fed by a run's metrics records: MLflow (``--mlflow``) and Weights &
Biases (``--wandb``), both optional extras (``pip install 'bilevel[mlflow]'`` / ``'bilevel[wandb]'``).

They go through the run loop's record callback (``run(..., on_record=...)``): each metrics
record, the numbers named as TensorBoard names them (bilevel.runtime.records), is logged at its
step. When the run starts, the tracker receives the resolved spec as flat parameters
(``levels.lower.solver.lr``, ...) and the run's name; when it ends, the final upper loss, the
wall time and the problem's report values as summary figures, and the run's status (finished,
failed, or killed for Ctrl-C). Where they write is each tool's own setting: MLFLOW_TRACKING_URI
(default ``./mlruns``, or what this MLflow version defaults to), WANDB_PROJECT, WANDB_MODE
(``offline`` writes ``./wandb`` without an account)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from bilevel.runtime.record_numbers import flat_params, scalar_values

__all__ = ["MLflowTracker", "Tracker", "TrackerSet", "TrackerUnavailable", "WandbTracker", "open_trackers", "summary_values"]


class TrackerUnavailable(RuntimeError):
    """A tracker was asked for whose package is not installed."""


class Tracker(Protocol):
    """What a tracker does: log one metrics record, then finish with the run's result."""

    def log(self, record: Mapping[str, Any]) -> None: ...

    def finish(self, result: Mapping[str, Any] | None, status: str) -> None: ...


def _missing(extra: str, package: str, exc: ImportError) -> TrackerUnavailable:
    return TrackerUnavailable(f"--{extra} needs the {package} package: pip install 'bilevel[{extra}]' (import failed: {exc})")


def summary_values(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a result.json worth a summary: final upper loss, wall time, steps, and the
    report's numbers as ``report/<key>`` (the known optimum's error and verdict included)."""
    out: dict[str, float] = {}
    for key in ("final_upper_loss", "wall_time_s", "steps"):
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    for key, value in (result.get("report") or {}).items():
        if isinstance(value, bool):
            out[f"report/{key}"] = float(value)
        elif isinstance(value, (int, float)):
            out[f"report/{key}"] = float(value)
        elif isinstance(value, Mapping) and "reached" in value:  # a known optimum
            out[f"report/{key}/error"] = float(value.get("error", float("nan")))
            out[f"report/{key}/reached"] = float(bool(value["reached"]))
    return out


class MLflowTracker:
    """Logs to MLflow: one MLflow run per bilevel run, in the experiment named after the spec."""

    def __init__(self, experiment: str, run_name: str, params: Mapping[str, Any]):
        try:
            import mlflow
        except ImportError as exc:
            raise _missing("mlflow", "mlflow", exc) from None
        self._mlflow = mlflow
        mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_name=run_name)
        # MLflow caps a parameter value at a few thousand characters: longer lists are cut
        mlflow.log_params({key: str(value)[:500] for key, value in params.items()})

    def log(self, record: Mapping[str, Any]) -> None:
        values = {name.replace("/", "."): value for name, value in scalar_values(record).items()}
        if values:
            self._mlflow.log_metrics(values, step=int(record["step"]))

    def finish(self, result: Mapping[str, Any] | None, status: str) -> None:
        if result is not None:
            self._mlflow.log_metrics({name.replace("/", "."): v for name, v in summary_values(result).items()})
        self._mlflow.end_run(status={"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[status])


class WandbTracker:
    """Logs to Weights & Biases: one W&B run per bilevel run, in WANDB_PROJECT (default: the
    spec's name), its files under the run directory."""

    def __init__(self, project: str, run_name: str, params: Mapping[str, Any], directory: Path):
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", "wandb", exc) from None
        import os

        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or project, name=run_name,
                               config=dict(params), dir=str(directory))

    def log(self, record: Mapping[str, Any]) -> None:
        values = scalar_values(record)
        if values:
            self._run.log(values, step=int(record["step"]))

    def finish(self, result: Mapping[str, Any] | None, status: str) -> None:
        if result is not None:
            for name, value in summary_values(result).items():
                self._run.summary[name] = value
        self._run.finish(exit_code={"finished": 0, "failed": 1, "killed": 130}[status])


class TrackerSet:
    """The trackers of one run, as one record callback and one finish."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def on_record(self, record: dict[str, Any]) -> None:
        """The run loop's record callback: log the record everywhere; never stops the run."""
        if record:
            for tracker in self.trackers:
                tracker.log(record)
        return None

    def finish(self, result: Mapping[str, Any] | None, interrupted: bool = False) -> None:
        """End every tracker's run: finished with ``result``, or failed / killed without one."""
        status = "finished" if result is not None else ("killed" if interrupted else "failed")
        for tracker in self.trackers:
            tracker.finish(result, status)

    def __bool__(self) -> bool:
        return bool(self.trackers)


def open_trackers(loaded: Any, out_dir: Path, mlflow: bool = False, wandb: bool = False) -> TrackerSet:
    """The trackers asked for, each started with the resolved spec of ``loaded`` (a LoadedSpec)
    as its parameters and the run directory's name as the run's name."""
    trackers: list[Tracker] = []
    if not (mlflow or wandb):
        return TrackerSet(trackers)
    params = flat_params(loaded.spec.model_dump(mode="json"))
    name = Path(out_dir).name or loaded.spec.name
    try:
        if mlflow:
            trackers.append(MLflowTracker(loaded.spec.name, name, params))
        if wandb:
            trackers.append(WandbTracker(loaded.spec.name, name, params, Path(out_dir)))
    except BaseException:
        TrackerSet(trackers).finish(None)  # a tracker that started is not left open
        raise
    return TrackerSet(trackers)
