"""The hyperparameter-optimization presets on digits (STN, unrolled, implicit), their outputs
(final hyperparameters in result.json, trajectories in metrics.jsonl and a plot), and the search
comparison script, in short runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import bilevel
from bilevel.presets import find_preset
from bilevel.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("preset", "engine"), [("hpo/mlp_stn", "stn"), ("hpo/mlp_lr_wd", "unrolled"), ("hpo/l2_per_weight", "implicit")])
def test_planner_picks_the_documented_engine(preset: str, engine: str) -> None:
    loaded = load_spec(find_preset(preset))
    assert bilevel.make_plan(bilevel.compile_spec(loaded, "cpu")).engine.kind == engine


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stn_preset_tunes_dropout_and_l2_and_plots_the_schedule(tmp_path: Path) -> None:
    loaded = load_spec(find_preset("hpo/mlp_stn"), overrides=["run.steps=40", "run.monitor_every=10"])
    result = bilevel.run(loaded, device="cpu", out=tmp_path, progress=False)
    written = json.loads((tmp_path / "result.json").read_text())
    final = written["upper_variables"]
    assert set(final) == {"dropout_in", "dropout_hidden", "l2"}
    assert 0.0 < final["dropout_in"] < 0.8 and 0.0 < final["dropout_hidden"] < 0.8 and 1e-6 <= final["l2"] <= 0.1
    assert final["dropout_in"] != pytest.approx(0.05, abs=1e-4)  # it moved
    report = written["report"]
    assert report["dropout_in"] == pytest.approx(final["dropout_in"]) and report["test_loss"] < 2.0
    records = _records(tmp_path)
    monitored = [r["monitor"] for r in records if "monitor" in r]
    assert len(monitored) == 4 and all(set(m) == {"dropout_in", "dropout_hidden", "l2"} for m in monitored)
    assert records[-1]["upper_loss"] < records[0]["upper_loss"]  # the network trains
    assert (tmp_path / "hyperparameters.png").stat().st_size > 0
    assert result.result["engine"] == "stn" and records[0]["hvp_count"] == 0


def test_unrolled_preset_tunes_the_learning_rate_and_weight_decay(tmp_path: Path) -> None:
    loaded = load_spec(find_preset("hpo/mlp_lr_wd"), overrides=["run.steps=8"])
    result = bilevel.run(loaded, device="cpu", out=tmp_path, progress=False)
    records = _records(tmp_path)
    assert result.result["final_upper_loss"] < records[0]["upper_loss"]
    final = result.result["upper_variables"]
    assert final["lr"] > 0.05 and 1e-6 <= final["weight_decay"] <= 0.1  # from 0.05: steps upward first
    assert (tmp_path / "hyperparameters.png").exists()


def test_implicit_preset_tunes_one_l2_strength_per_weight(tmp_path: Path) -> None:
    loaded = load_spec(find_preset("hpo/l2_per_weight"), overrides=["run.steps=10"])
    result = bilevel.run(loaded, device="cpu", out=tmp_path, progress=False)
    records = _records(tmp_path)
    assert result.result["final_upper_loss"] < records[0]["upper_loss"]
    strengths = result.result["upper_variables"]["l2"]
    assert len(strengths) == 10 and len(strengths[0]) == 64
    assert all(1e-5 <= s <= 1.0 for row in strengths for s in row)
    assert result.result["report"]["test_accuracy"] > 0.9


def _search_script():
    spec = importlib.util.spec_from_file_location("hpo_search", ROOT / "benchmarks" / "hpo_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_comparison_script_prints_its_table(tmp_path: Path) -> None:
    module = _search_script()
    out = tmp_path / "search.json"
    payload = module.main(["--trials", "2", "--steps", "5", "--json", str(out)])
    (single,) = payload["runs"]
    methods = [row["method"] for row in single["rows"]]
    assert methods[0] == "STN" and any("Optuna TPE" in m for m in methods) and any("random search" in m for m in methods)
    assert single["trial_training_steps"] == 10 and len(single["random_trials"]) == 2
    assert json.loads(out.read_text())["runs"][0]["table"].startswith("| method |")


@pytest.mark.slow
def test_stn_beats_the_best_of_eight_random_trials_in_less_time() -> None:
    """The README's claim at a reduced size (8 random trials instead of 30, seed 0, the preset's
    1500 outer steps, one thread as in the benchmark): STN's test loss is at most that of the
    random trial with the lowest validation loss, and STN takes less wall time than the 8
    trainings (each as long as STN's training)."""
    import shutil

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comparison = _search_script().compare(trials=8, steps=None, seed=0, optuna=False)
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(comparison["stn_out"], ignore_errors=True)  # the STN run's directory
    stn, search = comparison["rows"][:2]
    assert stn["method"] == "STN" and search["method"] == "random search, 8 trials" and search["trainings"] == 8
    assert stn["test_loss"] <= search["test_loss"], (stn, search)
    assert stn["wall_time_s"] < search["wall_time_s"], (stn, search)
