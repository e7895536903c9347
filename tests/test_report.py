"""`bilevel report`: plots and a markdown summary comparing runs; TensorBoard events beside
metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bilevel import run
from bilevel.cli import app
from bilevel.reporting import default_report_dir, load_runs
from bilevel.spec import spec_from_data
from problems.toy import ridge_spec

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def _hooked(tmp_path: Path, name: str, engine: str, outer_lr: float, **run_settings) -> Path:
    """A scalar-lambda ridge run with a monitor (validation loss and the weights) and a report."""
    hooks = tmp_path / "hooks.py"
    hooks.write_text(
        "def monitor(upper, lower, *, step, out_dir):\n"
        "    return {'w_norm': float(lower['w'].norm()), 'w_head': lower['w'][:3]}\n"
        "def report(upper, lower):\n"
        "    return {'lam': float(upper['lam']), 'note': 'ok'}\n"
    )
    data = ridge_spec(per_feature=False, inner_steps=60).model_dump(mode="json")
    data["levels"]["upper"]["solver"] = {"name": "sgd", "lr": outer_lr}
    data.update(engine={"kind": engine}, monitor=f"{hooks}:monitor", report=f"{hooks}:report")
    data["run"].update(steps=12, monitor_every=4, out=str(tmp_path / name), **run_settings)
    run(spec_from_data(data), progress=False)
    return tmp_path / name


def test_report_on_two_runs_writes_plots_and_a_summary(tmp_path: Path) -> None:
    a = _hooked(tmp_path, "implicit-run", "implicit", 0.5)
    b = _hooked(tmp_path, "unrolled-run", "unrolled", 2.0)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["report", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output

    expected = ["upper_loss.png", "hypergrad_norm.png", "inner_residual.png", "linear_residual.png",
                "upper_lam.png", "monitor_w_norm.png", "monitor_w_head.png"]
    for name in expected:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in (out / "report.md").read_text()

    text = (out / "report.md").read_text()
    results = [json.loads((d / "result.json").read_text()) for d in (a, b)]
    table = [line for line in text.splitlines() if line.startswith("| implicit-run") or line.startswith("| unrolled-run")]
    assert len(table) == 4  # the run table and the report-values table
    for row, res in zip(table[:2], results):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == res["engine"] and cells[2] == "completed" and cells[3] == "12"
        assert float(cells[5]) == pytest.approx(res["final_upper_loss"], rel=1e-5)
        assert float(cells[8]) == pytest.approx(res["wall_time_s"], rel=1e-5)
    assert "| run | lam | note |" in text
    assert float(table[2].split("|")[2]) == pytest.approx(results[0]["report"]["lam"], rel=1e-5)

    summary = json.loads((out / "report.json").read_text())
    assert [r["engine"] for r in summary["runs"]] == ["implicit", "unrolled"]
    # the trajectories plotted are the ones logged: lam at every step, the monitor every 4 steps
    runs = load_runs([a, b])
    steps, values = runs[0].nested("upper", "lam")
    assert steps == list(range(1, 13)) and values[0] == [-1.0]
    assert runs[1].nested("monitor", "w_head")[0] == [4, 8, 12]


def test_report_defaults_and_errors(tmp_path: Path) -> None:
    a = _hooked(tmp_path, "only", "implicit", 0.5)
    result = runner.invoke(app, ["report", str(a)])
    assert result.exit_code == 0 and (a / "report" / "report.md").exists()
    assert default_report_dir([tmp_path / "x" / "a", tmp_path / "x" / "b"]) == (tmp_path / "x" / "report").resolve()

    (tmp_path / "empty").mkdir()
    bad = runner.invoke(app, ["report", str(a), str(tmp_path / "empty")])
    assert bad.exit_code == 2 and "no result.json or metrics.jsonl" in bad.output


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
