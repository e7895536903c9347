"""MLflow and Weights & Biases through the run loop's record callback (`bilevel run --mlflow`,
`--wandb`): what each receives, and a clear error without the package."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bilevel.cli import app
from bilevel.runtime.records import flat_params, scalar_values
from bilevel.runtime.trackers import summary_values
from problems.toy import ridge_spec

runner = CliRunner()


def _spec(tmp_path: Path) -> Path:
    data = ridge_spec(per_feature=False, inner_steps=30).model_dump(mode="json")
    data["run"].update(steps=6, checkpoint_every=None)
    path = tmp_path / "ridge.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_record_values_name_numbers_as_tensorboard_does() -> None:
    record = {"step": 3, "upper_loss": 0.5, "hvp_count": 20, "flag": True, "upper": {"lam": [0.1, 0.2], "mu": 1.0},
              "monitor": {"acc": 0.9, "long": list(range(40)), "note": "x"}}
    assert scalar_values(record) == {"upper_loss": 0.5, "hvp_count": 20.0, "upper/lam/0": 0.1, "upper/lam/1": 0.2,
                                     "upper/mu": 1.0, "monitor/acc": 0.9}
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}
    result = {"final_upper_loss": 0.25, "wall_time_s": 1.5, "steps": 6, "engine": "implicit",
              "report": {"acc": 0.9, "ok": True, "known_optimum": {"reached": True, "error": 1e-3}}}
    assert summary_values(result) == {"final_upper_loss": 0.25, "wall_time_s": 1.5, "steps": 6.0, "report/acc": 0.9,
                                      "report/ok": 1.0, "report/known_optimum/error": 1e-3, "report/known_optimum/reached": 1.0}


def test_mlflow_receives_params_every_record_and_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run-a"
    result = runner.invoke(app, ["run", str(_spec(tmp_path)), "-q", "--out", str(out), "--mlflow"])
    assert result.exit_code == 0, result.output
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "toy-ridge"]
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run-a"
    assert logged.data.params["levels.lower.solver.steps"] == "30" and logged.data.params["run.steps"] == "6"
    history = client.get_metric_history(logged.info.run_id, "upper_loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["upper_loss"])) for r in _records(out)]
    assert len(client.get_metric_history(logged.info.run_id, "upper.lam")) == 6
    final = json.loads((out / "result.json").read_text())
    assert logged.data.metrics["final_upper_loss"] == pytest.approx(final["final_upper_loss"])


class _FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.exit_code: int | None = None

    def log(self, values, step):
        self.logged.append((values, step))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_wandb_receives_config_every_record_and_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a stand-in for the wandb module: the calls the tracker makes."""
    runs: list[_FakeRun] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "run-b"
    result = runner.invoke(app, ["run", str(_spec(tmp_path)), "-q", "--out", str(out), "--wandb"])
    assert result.exit_code == 0, result.output
    (run,) = runs
    assert run.init["project"] == "toy-ridge" and run.init["name"] == "run-b" and run.init["dir"] == str(out)
    assert run.init["config"]["levels.lower.solver.steps"] == 30
    records = _records(out)
    assert [step for _, step in run.logged] == [r["step"] for r in records]
    assert run.logged[-1][0]["upper_loss"] == pytest.approx(records[-1]["upper_loss"]) and "upper/lam" in run.logged[0][0]
    assert run.summary["final_upper_loss"] == pytest.approx(json.loads((out / "result.json").read_text())["final_upper_loss"])
    assert run.exit_code == 0


def test_wandb_offline_run_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run-c"
    result = runner.invoke(app, ["run", str(_spec(tmp_path)), "-q", "--out", str(out), "--wandb"])
    assert result.exit_code == 0, result.output
    (offline,) = list((out / "wandb").glob("offline-run-*"))
    assert list(offline.glob("run-*.wandb"))[0].stat().st_size > 0


@pytest.mark.parametrize(("flag", "package"), [("--mlflow", "mlflow"), ("--wandb", "wandb")])
def test_a_missing_tracker_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    result = runner.invoke(app, ["run", str(_spec(tmp_path)), "-q", "--out", str(tmp_path / "x"), flag])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {flag} needs the {package} package: pip install 'bilevel[{package}]'" in result.output
    assert not (tmp_path / "x" / "result.json").exists()
