"""The CLI's happy paths: engines, problems, schema, plan, hypergrad --json, run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from bilevel.cli import app
from problems.toy import quadratic_data, quadratic_hypergrad, quadratic_spec

runner = CliRunner()


def _spec_file(tmp_path: Path, **changes) -> Path:
    data = quadratic_spec(inner_steps=400).model_dump(mode="json")
    data["levels"]["upper"]["variables"]["x"]["init"] = 0.5
    for key, value in changes.items():
        data["levels"]["lower"][key] = value
    path = tmp_path / "quadratic.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_engines_lists_every_engine() -> None:
    result = runner.invoke(app, ["engines", "--json"])
    assert result.exit_code == 0
    assert {"implicit", "unrolled", "penalty", "bo_rep", "lv_hba"} <= set(json.loads(result.output))
    assert "implicit:" in runner.invoke(app, ["engines"]).output


def test_problems_lists_the_default_preset() -> None:
    result = runner.invoke(app, ["problems"])
    assert result.exit_code == 0 and "hyperclean/digits" in result.output and "(default)" in result.output


def test_schema_is_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    schema = json.loads(result.output)
    assert {"levels", "engine", "run"} <= set(schema["properties"])
    assert schema["$schema"].startswith("https://json-schema.org/")


def test_plan_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(_spec_file(tmp_path)), "--json"])
    plan = json.loads(result.output)
    assert plan["engine"] == "implicit" and plan["reasons"]
    text = runner.invoke(app, ["plan", str(_spec_file(tmp_path)), "--engine", "implicit"]).output
    assert "why:" in text
    warned = runner.invoke(app, ["plan", str(_spec_file(tmp_path, assumptions={"convexity": "nonconvex"})), "--engine", "implicit"])
    assert "warning:" in warned.output and "nonconvex" in warned.output


def test_hypergrad_json_matches_the_closed_form(tmp_path: Path) -> None:
    for engine in ("implicit", "unrolled"):
        result = runner.invoke(app, ["hypergrad", str(_spec_file(tmp_path)), "--engine", engine, "--json"])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.output)
        assert payload["engine"] == engine and isinstance(payload["upper_loss"], float)
        got = torch.tensor(payload["hypergradient"]["x"], dtype=torch.float64)
        want = quadratic_hypergrad(torch.full((3,), 0.5, dtype=torch.float64), quadratic_data())
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)


def test_run_writes_result_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(_spec_file(tmp_path)), "--out", str(out), "-q", "--set", "run.steps=3"])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "result.json").read_text())
    for key in ("engine", "plan_reasons", "final_upper_loss", "upper_variables", "steps", "wall_time_s", "device", "status"):
        assert key in written
    assert written["steps"] == 3 and written["status"] == "completed" and len(written["upper_variables"]["x"]) == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"upper_loss", "hypergrad_norm", "inner_residual", "linear_residual", "hvp_count", "time_s"} <= set(records[0])


def test_bad_override_is_a_spec_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_spec_file(tmp_path)), "--set", "run.steps=-1"])
    assert result.exit_code == 2 and "run.steps" in result.output


def test_hypergrad_says_when_the_engine_returns_a_search_direction(tmp_path: Path) -> None:
    exact = json.loads(runner.invoke(app, ["hypergrad", str(_spec_file(tmp_path)), "--json"]).output)
    assert exact["is_hypergradient"] is True
    single_loop = runner.invoke(app, ["hypergrad", str(_spec_file(tmp_path)), "--engine", "penalty"])
    assert single_loop.exit_code == 0 and "not a hypergradient" in single_loop.output
