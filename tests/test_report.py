"""`bilevel report`: multi-panel figures, a markdown summary, CSV tables and aggregates across
seeds and instances comparing runs; the same tables as DataFrames (bilevel.load_runs, ...);
TensorBoard events beside metrics.jsonl."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bilevel
from bilevel import run
from bilevel.cli import app
from bilevel.reporting import default_report_dir, read_runs
from bilevel.reporting.aggregate import aggregate_rows, mean_std_ci
from bilevel.reporting.plots import log_scale_variables, metrics_figure, panel_names, trajectories_figure
from bilevel.reporting.table import run_rows
from bilevel.spec import spec_from_data
from problems.toy import ridge_spec

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def _hooked(tmp_path: Path, name: str, engine: str, outer_lr: float, seed: int = 0, variable: dict | None = None,
            monitor_lam: bool = False, instances: int | None = None, **run_settings) -> Path:
    """A scalar-lambda ridge run with a monitor (weights, optionally lam again) and a report; ``seed``
    sets the run's seed and both data splits' seeds."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    hooks = tmp_path / "hooks.py"
    hooks.write_text(
        "from bilevel.reporting import known_optimum\n"
        "def monitor(upper, lower, *, step, out_dir, lam=False):\n"
        "    out = {'w_norm': float(lower['w'].norm()), 'w_head': lower['w'][:3]}\n"
        "    if lam:\n"
        "        out['lam'] = float(upper['lam'])\n"
        "    return out\n"
        "def report(upper, lower):\n"
        "    lam = float(upper['lam'])\n"
        "    return {'lam': lam, 'note': 'ok', 'known_optimum': known_optimum('lam* = -1', abs(lam + 1), 0.5, '|lam - lam*|')}\n"
    )
    data = ridge_spec(per_feature=False, inner_steps=60, seed=seed).model_dump(mode="json")
    data["levels"]["upper"]["solver"] = {"name": "sgd", "lr": outer_lr}
    if variable is not None:
        data["levels"]["upper"]["variables"]["lam"] = variable
    data.update(engine={"kind": engine}, monitor=f"{hooks}:monitor", report=f"{hooks}:report")
    if monitor_lam:
        data["monitor_kwargs"] = {"lam": True}
    if instances is not None:
        seeds = list(range(instances))
        data["instances"] = {"count": instances, "vary": {"levels.upper.data.kwargs.seed": seeds,
                                                          "levels.lower.data.kwargs.seed": seeds}}
    data["run"].update(steps=12, monitor_every=4, out=str(tmp_path / name), **run_settings)
    run(spec_from_data(data), progress=False)
    return tmp_path / name


def test_report_on_two_runs_writes_figures_and_a_summary(tmp_path: Path) -> None:
    a = _hooked(tmp_path, "implicit-run", "implicit", 0.5)
    b = _hooked(tmp_path, "unrolled-run", "unrolled", 2.0)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["report", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output

    text = (out / "report.md").read_text()
    for name in ("metrics.png", "hyperparameters.png", "monitor.png"):  # three figures, not one PNG per series
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in text
    assert sorted(p.name for p in out.glob("*.png")) == ["hyperparameters.png", "metrics.png", "monitor.png"]

    results = [json.loads((d / "result.json").read_text()) for d in (a, b)]
    table = [line for line in text.splitlines() if line.startswith("| implicit-run") or line.startswith("| unrolled-run")]
    assert len(table) == 6  # the run table, the report values, the spec fields that differ
    assert "| run | levels.upper.solver.lr |\n" in text  # not every setting of each engine
    for row, res in zip(table[:2], results):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == res["engine"] and cells[2] == "completed" and cells[3] == "12"
        assert float(cells[5]) == pytest.approx(res["final_upper_loss"], rel=1e-5)
        assert float(cells[8]) == pytest.approx(res["wall_time_s"], rel=1e-5)
        assert cells[10] == str(res["threads"])
    assert "| run | lam | note | known optimum |" in text
    assert float(table[2].split("|")[2]) == pytest.approx(results[0]["report"]["lam"], rel=1e-5)
    assert "reached (error" in table[2]
    # engines differ, nothing else: no aggregate section (each configuration has one run)
    assert "## Across seeds" not in text

    summary = json.loads((out / "report.json").read_text())
    assert [r["engine"] for r in summary["runs"]] == ["implicit", "unrolled"]
    assert summary["figures"] == ["metrics.png", "hyperparameters.png", "monitor.png"]
    # the trajectories plotted are the ones logged: lam at every step, the monitor every 4 steps
    runs = read_runs([a, b])
    steps, values = runs[0].nested("upper", "lam")
    assert steps == list(range(1, 13)) and values[0] == [-1.0]
    assert runs[1].nested("monitor", "w_head")[0] == [4, 8, 12]


def test_metrics_figure_has_step_and_wall_clock_rows(tmp_path: Path) -> None:
    runs = read_runs([_hooked(tmp_path, "a", "implicit", 0.5), _hooked(tmp_path, "b", "unrolled", 2.0)])
    figure = metrics_figure(runs)
    axes = [ax for ax in figure.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    # implicit reports a linear-solve residual: four series, each by step (top) and by wall-clock time (bottom)
    assert titles[:4] == ["upper loss F(x, y)", "hypergradient norm ||dF/dx||", "inner residual ||grad_y G||",
                          "linear-solve residual (relative)"] and titles[4:] == titles[:4]
    assert [ax.get_xlabel() for ax in axes] == ["outer step"] * 4 + ["wall-clock time (s)"] * 4
    assert [ax.get_yscale() for ax in axes[:4]] == ["linear", "log", "log", "log"]
    elapsed = [r["elapsed_s"] for r in runs[0].records]
    line = axes[4].get_lines()[0]
    assert list(line.get_xdata()) == pytest.approx(elapsed)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["a", "b"]


def test_log_scale_hyperparameters_and_no_duplicated_monitor_panels(tmp_path: Path) -> None:
    """A hyperparameter declared log: true gets a log axis; a monitor value named as an upper
    variable is not drawn a second time."""
    variable = {"kind": "hyperparameter", "low": 1e-3, "high": 10.0, "log": True, "init": 0.3}
    a = _hooked(tmp_path, "logged", "implicit", 0.5, variable=variable, monitor_lam=True)
    out = tmp_path / "cmp"
    assert runner.invoke(app, ["report", str(a), "--out", str(out)]).exit_code == 0
    runs = read_runs([a])
    assert runs[0].nested_names("monitor") == ["w_norm", "w_head", "lam"]
    assert log_scale_variables(runs[0]) == {"lam"}
    hyper = trajectories_figure(runs, "upper", ["lam"], {"lam"})
    assert hyper.axes[0].get_yscale() == "log" and hyper.axes[0].get_title() == "lam (log scale)"
    assert panel_names(runs) == {"upper": ["lam"], "monitor": ["w_norm", "w_head"]}  # lam drawn once
    assert "monitor.png" in (out / "report.md").read_text()
    plain = trajectories_figure(runs, "upper", ["lam"], set())  # without the declaration: values within a decade
    assert plain.axes[0].get_yscale() == "linear"


def test_report_csv_and_aggregates_across_seeds(tmp_path: Path) -> None:
    """Three seeds of one configuration and one run of another: runs.csv lists all four with
    their seeds, aggregate.csv and report.md give mean, std and the t interval per configuration."""
    seeds = [_hooked(tmp_path / "runs", f"implicit-s{s}", "implicit", 0.5, seed=s) for s in (0, 1, 2)]
    other = _hooked(tmp_path / "runs", "unrolled-s0", "unrolled", 0.5, seed=0)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out), "--csv"])  # a directory of runs
    assert result.exit_code == 0, result.output
    assert "table: " in result.output and (out / "runs.csv").exists()

    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == ["implicit-s0", "implicit-s1", "implicit-s2", "unrolled-s0"]
    assert [r["seed"] for r in rows] == ["0", "1", "2", "0"]
    assert rows[1]["spec.levels.lower.data.kwargs.seed"] == "1"
    assert "spec.run.seed" not in rows[0] and "spec.run.out" not in rows[0]
    losses = [float(r["final_upper_loss"]) for r in rows[:3]]
    assert len(set(losses)) == 3 and rows[0]["known_optimum.reached"] in ("true", "false")

    with (out / "aggregate.csv").open() as handle:
        groups = list(csv.DictReader(handle))
    assert [(g["engine"], g["n"]) for g in groups] == [("implicit", "3"), ("unrolled", "1")]
    mean = sum(losses) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in losses) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t_{0.975, 2}
    assert float(groups[0]["final_upper_loss.mean"]) == pytest.approx(mean, rel=1e-12)
    assert float(groups[0]["final_upper_loss.std"]) == pytest.approx(std, rel=1e-9)
    assert float(groups[0]["final_upper_loss.ci95_low"]) == pytest.approx(mean - half, rel=1e-9)
    assert groups[1]["final_upper_loss.std"] == ""  # one run: no spread
    text = (out / "report.md").read_text()
    assert "## Across seeds, instances and trials" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| implicit | 3 | final_upper_loss |"))
    assert bilevel.reporting.format_number(mean) in line

    with (out / "metrics.csv").open() as handle:
        steps = list(csv.DictReader(handle))
    assert len(steps) == 4 * 12 and {"run", "step", "upper_loss", "upper/lam", "monitor/w_head/2"} <= set(steps[0])
    assert seeds and other


def test_aggregate_over_the_instances_of_a_batch(tmp_path: Path) -> None:
    a = _hooked(tmp_path, "batch", "implicit", 0.5, instances=3)
    rows = run_rows(read_runs([a]), instances=True)
    assert [r["instance"] for r in rows] == [0, 1, 2]
    assert [r["spec.levels.lower.data.kwargs.seed"] for r in rows] == [0, 1, 2]
    (group,) = aggregate_rows(rows)
    assert group["n"] == 3
    values = [r["report.lam"] for r in rows]
    mean, std, half = mean_std_ci(values)
    assert group["report.lam.mean"] == pytest.approx(mean) and group["report.lam.ci95_high"] == pytest.approx(mean + half)
    assert std is not None and std > 0
    out = tmp_path / "cmp"
    assert runner.invoke(app, ["report", str(a), "--out", str(out), "--csv"]).exit_code == 0
    assert (out / "instances.csv").exists() and "| implicit | 3 | final_upper_loss |" in (out / "report.md").read_text()


def test_mean_std_ci() -> None:
    mean, std, half = mean_std_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(1.2909944487358056)
    assert half == pytest.approx(3.182446305284263 * std / 2)  # t_{0.975, 3}
    assert mean_std_ci([5.0]) == (5.0, None, None)


def test_load_runs_as_dataframes(tmp_path: Path) -> None:
    pandas = pytest.importorskip("pandas")
    for s in (0, 1):
        _hooked(tmp_path / "runs", f"s{s}", "implicit", 0.5, seed=s)
    frame = bilevel.load_runs(tmp_path / "runs")
    assert isinstance(frame, pandas.DataFrame) and list(frame["run"]) == ["s0", "s1"]
    assert list(frame["seed"]) == [0, 1] and frame["final_upper_loss"].dtype.kind == "f"
    assert "report.lam" in frame.columns and frame["known_optimum.reached"].dtype == bool
    globbed = bilevel.load_runs(str(tmp_path / "runs" / "s*"))
    assert list(globbed["run"]) == ["s0", "s1"]
    steps = bilevel.load_metrics([tmp_path / "runs" / "s0"])
    assert list(steps["step"]) == list(range(1, 13)) and "upper/lam" in steps.columns
    summary = bilevel.aggregate_runs(tmp_path / "runs")
    assert list(summary["n"]) == [2]
    assert summary["final_upper_loss.mean"][0] == pytest.approx(frame["final_upper_loss"].mean())
    assert summary["final_upper_loss.std"][0] == pytest.approx(frame["final_upper_loss"].std())


def test_load_runs_names_the_extra_when_pandas_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _hooked(tmp_path, "a", "implicit", 0.5)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'bilevel\[pandas\]'"):
        bilevel.load_runs(a)


def test_report_defaults_and_errors(tmp_path: Path) -> None:
    a = _hooked(tmp_path, "only", "implicit", 0.5)
    result = runner.invoke(app, ["report", str(a)])
    assert result.exit_code == 0 and (a / "report" / "report.md").exists()
    assert default_report_dir([tmp_path / "x" / "a", tmp_path / "x" / "b"]) == (tmp_path / "x" / "report").resolve()

    (tmp_path / "empty").mkdir()
    bad = runner.invoke(app, ["report", str(a), str(tmp_path / "empty")])
    assert bad.exit_code == 2 and "no result.json or metrics.jsonl" in bad.output and "Traceback" not in bad.output
    nothing = runner.invoke(app, ["report", str(tmp_path / "nope-*")])
    assert nothing.exit_code == 2 and "no run directories" in nothing.output


def test_report_reads_a_killed_run(tmp_path: Path) -> None:
    """A run without result.json (killed) and with a torn last metrics line is reported as incomplete."""
    a = _hooked(tmp_path, "done", "implicit", 0.5)
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (a / "metrics.jsonl").read_text().splitlines()[:5]
    (killed / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "upper_lo')
    out = tmp_path / "cmp"
    assert runner.invoke(app, ["report", str(a), str(killed), "--out", str(out)]).exit_code == 0
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| killed"))
    assert "incomplete" in row and "| 5 |" in row


def test_run_files_are_readable_by_the_group(tmp_path: Path) -> None:
    """Atomic writes used to leave mkstemp's 0600: the run files get the umask's mode instead."""
    import os

    old = os.umask(0o022)
    try:
        a = _hooked(tmp_path, "modes", "implicit", 0.5)
    finally:
        os.umask(old)
    for name in ("result.json", "metrics.jsonl", "checkpoint.pt"):
        assert (a / name).stat().st_mode & 0o777 == 0o644, name


def test_tensorboard_events_hold_the_metrics_and_monitor(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = _hooked(tmp_path, "tb", "implicit", 0.5, tensorboard=True)
    events = EventAccumulator(str(a / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"upper_loss", "hypergrad_norm", "inner_residual", "upper/lam", "monitor/w_norm", "monitor/w_head/2"} <= tags
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in events.Scalars("upper_loss")]
    assert logged == [(r["step"], pytest.approx(r["upper_loss"], rel=1e-6)) for r in records]
    assert [e.step for e in events.Scalars("monitor/w_norm")] == [4, 8, 12]
