"""`bilevel sweep`: Optuna trials over engine, outer lr and inner steps, each in its own run
directory, pruned on the upper loss, the study kept in SQLite and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from bilevel.cli import app
from bilevel.spec import SpecError
from bilevel.sweeps import default_space, prepare_sweep, run_sweep, trial_states
from problems.toy import ridge_spec

runner = CliRunner()


def _files(tmp_path: Path, space: dict | None = None, **sweep) -> Path:
    spec = ridge_spec(per_feature=False, inner_steps=30).model_dump(mode="json")
    spec["run"].update(steps=6, checkpoint_every=None)
    (tmp_path / "ridge.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    section = {
        "spec": "ridge.yaml",
        "study": "ridge",
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "out": str(tmp_path / "trials"),
        "trials": 2,
        "space": space if space is not None else {
            "engine": {"choices": ["implicit", "unrolled"]},
            "outer_lr": {"low": 0.01, "high": 1.0, "log": True},
            "inner_steps": {"low": 5, "high": 40},
        },
        **sweep,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": section}, sort_keys=False))
    return path


def test_sweep_runs_trials_in_their_own_directories_and_resumes(tmp_path: Path) -> None:
    sweep = _files(tmp_path, pruner={"kind": "none"})
    first = runner.invoke(app, ["sweep", str(sweep)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["sweep", str(sweep)])
    assert again.exit_code == 0, again.output
    assert "4 trials (4 complete)" in again.output

    study = optuna.load_study(study_name="ridge", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == tmp_path / "trials" / f"trial-{trial.number:04d}"
        result = json.loads((run_dir / "result.json").read_text())
        info = json.loads((run_dir / "trial.json").read_text())
        assert info["params"] == trial.params
        # the sampled settings are the ones the trial ran with
        assert result["engine"] == trial.params["engine"]
        assert result["last_stats"]["inner_steps"] == trial.params["inner_steps"]
        assert trial.value == result["final_upper_loss"]
        assert 0.01 <= trial.params["outer_lr"] <= 1.0
    # a resumed study continues the sampler's sequence instead of repeating the first proposals
    assert study.trials[0].params != study.trials[2].params

    report = runner.invoke(app, ["report", *(str(tmp_path / "trials" / f"trial-{i:04d}") for i in range(4)),
                                 "--out", str(tmp_path / "cmp")])
    assert report.exit_code == 0 and "## Sweep parameters" in (tmp_path / "cmp" / "report.md").read_text()
    # the trials' directory stands for the trials; the sampled parameters are columns
    table = runner.invoke(app, ["report", str(tmp_path / "trials"), "--out", str(tmp_path / "cmp2"), "--csv"])
    assert table.exit_code == 0, table.output
    import csv

    with (tmp_path / "cmp2" / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    for row, trial in zip(rows, study.trials):
        assert row["param.engine"] == trial.params["engine"] and int(row["param.inner_steps"]) == trial.params["inner_steps"]
        assert float(row["param.outer_lr"]) == pytest.approx(trial.params["outer_lr"])
    assert not any(k.startswith("spec.levels.lower.solver.steps") for k in rows[0])  # shown as param.inner_steps
    with (tmp_path / "cmp2" / "aggregate.csv").open() as handle:
        groups = list(csv.DictReader(handle))
    assert len(groups) == 4 and {"param.engine", "param.outer_lr", "param.inner_steps"} <= set(groups[0])


def test_pruned_trials_stop_their_runs_early(tmp_path: Path) -> None:
    sweep = _files(tmp_path, pruner={"kind": "threshold", "upper": -1.0, "n_warmup_steps": 2})
    result = runner.invoke(app, ["sweep", str(sweep), "--trials", "1"])
    assert result.exit_code == 0, result.output
    (trial,) = optuna.load_study(study_name="ridge", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [1, 2]  # reported each step, pruned once the warm-up is over
    outcome = json.loads((Path(trial.user_attrs["run_dir"]) / "result.json").read_text())
    assert outcome["status"] == "stopped_early" and outcome["steps"] == 2 and "pruned" in outcome["stop_reason"]


@pytest.mark.parametrize(
    ("space", "extra", "path", "message"),
    [
        ({"engine": {"choices": ["implicit", "magic"]}}, {}, "sweep.space.engine.choices", "unknown engine kind"),
        ({"outer_lr": {"low": 1.0, "high": 0.1}}, {}, "sweep.space.outer_lr", "must be smaller than high"),
        ({"outer_lr": {"low": 0.0, "high": 0.1, "log": True}}, {}, "sweep.space.outer_lr", "log: true needs low > 0"),
        ({"momentum": {"low": 0.1, "high": 0.9}}, {}, "sweep.space.momentum", "unknown parameter"),
        ({"inner_steps": {"low": -3, "high": 10}}, {}, "sweep.space.inner_steps", "makes the spec invalid"),
        ({"mu": {"low": 0.1, "high": 0.9, "path": "levels.lower.solver.nonsense"}}, {}, "sweep.space.mu", "unknown field"),
        ({"mu": {"low": 0.1, "high": 0.9, "path": "run.steps.deeper"}}, {}, "sweep.space.mu.path", "does not lead to a field"),
        ({"engine": {"low": 1, "high": 2}}, {}, "sweep.space.engine", "categorical"),
        ({}, {"pruner": {"kind": "threshold"}}, "sweep.pruner", "needs upper"),
        ({}, {"objective": "accuracy"}, "sweep.objective", "unknown objective"),
        ({}, {"trials": 0}, "sweep.trials", "greater than or equal to 1"),
    ],
)
def test_bad_sweeps_are_clear_errors(tmp_path: Path, space: dict, extra: dict, path: str, message: str) -> None:
    sweep = _files(tmp_path, space=space or None, **extra)
    with pytest.raises(SpecError) as info:
        prepare_sweep(str(sweep))
    text = str(info.value)
    assert str(sweep) in text and path in text and message in text, text
    cli = runner.invoke(app, ["sweep", str(sweep)])
    assert cli.exit_code == 2 and "Traceback" not in cli.output


def test_default_space_follows_the_spec(tmp_path: Path) -> None:
    spec = ridge_spec(per_feature=False, inner_steps=40)
    space = default_space(spec)
    assert space["outer_lr"].low == pytest.approx(0.005) and space["outer_lr"].high == pytest.approx(0.5)
    assert (space["inner_steps"].low, space["inner_steps"].high) == (10, 80)
    assert set(space["engine"].choices) == {"implicit", "unrolled", "forward"}  # strongly convex: the hypergradient engines
    data = spec.model_dump(mode="json")
    data["levels"]["lower"]["assumptions"]["convexity"] = "nonconvex"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    plan = prepare_sweep(str(tmp_path / "spec.yaml"))  # a spec without a sweep file: the defaults
    assert [d.name for d in plan.dimensions] == ["outer_lr", "inner_steps", "engine"]
    assert set(plan.dimensions[2].param.choices) == {"unrolled", "forward"}  # through the optimizer only; no zero-order


def test_the_example_sweep_runs(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "sweeps" / "hpo_l2.yaml"
    plan = prepare_sweep(str(example), overrides=["run.steps=3"], trials=1, out=str(tmp_path / "trials"),
                         storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [d.name for d in plan.dimensions] == ["engine", "outer_lr", "inner_steps"]
    assert plan.base.spec.run.steps == 3 and plan.base.spec.name == "hpo-l2-scalar"
    result = run_sweep(plan.sweep, plan.base, plan.dimensions, plan.out)
    (trial,) = result.study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert (tmp_path / "trials" / "trial-0000" / "result.json").exists()


def test_ctrl_c_records_the_running_trial_as_interrupted(tmp_path: Path) -> None:
    """SIGINT while a trial runs: one line saying what happened, exit code 130, no traceback; the
    trial is interrupted (not failed) in the study, its trial.json and the report."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sweep = _files(tmp_path, pruner={"kind": "none"}, trials=4, set=["run.steps=100000"])
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen([sys.executable, "-m", "bilevel", "sweep", str(sweep)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(root)})
    started = tmp_path / "trials" / "trial-0000" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (started.exists() and started.stat().st_size) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert lines == [f"interrupted: trial 0 ({tmp_path / 'trials' / 'trial-0000'}) recorded as"
                     " interrupted; the study holds 0 finished trial(s); run the sweep again to add trials"], err

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="ridge", storage=storage)
    assert trial_states(study) == {0: "interrupted"}
    assert study.trials[0].user_attrs["status"] == "interrupted"
    assert json.loads((started.parent / "trial.json").read_text())["status"] == "interrupted"
    report = runner.invoke(app, ["report", str(tmp_path / "trials"), "--out", str(tmp_path / "cmp")])
    assert report.exit_code == 0, report.output
    row = next(line for line in (tmp_path / "cmp" / "report.md").read_text().splitlines() if line.startswith("| trial-0000"))
    assert "| interrupted |" in row
    again = runner.invoke(app, ["sweep", str(sweep), "--trials", "1", "--set", "run.steps=3"])  # the study goes on
    assert again.exit_code == 0, again.output
    assert "2 trials (1 interrupted, 1 complete)" in again.output
