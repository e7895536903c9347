"""The bundled problems and examples do what their READMEs say."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import bilevel
from bilevel.presets import DEFAULT_PRESET, find_preset, list_presets
from bilevel.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def test_every_preset_validates_and_plans() -> None:
    presets = list_presets()
    assert DEFAULT_PRESET in presets and {"hpo/l2_scalar", "hpo/l2_per_feature"} <= set(presets)
    for name in presets:
        loaded = load_spec(find_preset(name))
        plan = bilevel.make_plan(bilevel.compile_spec(loaded, "cpu"))
        assert plan.reasons


def test_default_preset_beats_noisy_training(tmp_path: Path) -> None:
    """The README's main job: hyper-cleaning on digits, under 2 minutes on CPU, at least 5 points
    of test accuracy above training on the noisy labels, with most corrupted labels detected."""
    began = time.perf_counter()
    result = bilevel.run(load_spec(find_preset(DEFAULT_PRESET)), device="cpu", out=tmp_path, progress=False)
    elapsed = time.perf_counter() - began
    report = result.result["report"]
    assert elapsed < 120
    assert report["test_accuracy"] >= report["baseline_noisy_train_test_accuracy"] + 0.05
    assert report["detection_f1"] > 0.85
    written = json.loads((tmp_path / "result.json").read_text())
    for key in ("engine", "plan_reasons", "final_upper_loss", "upper_variables", "steps", "wall_time_s", "device"):
        assert key in written
    assert len(written["upper_variables"]["lam"]) == 600


@pytest.mark.parametrize("preset", ["hpo/l2_scalar", "hpo/l2_per_feature"])
def test_hpo_presets_lower_the_validation_loss(preset: str, tmp_path: Path) -> None:
    loaded = load_spec(find_preset(preset), overrides=["run.steps=40"])
    result = bilevel.run(loaded, device="cpu", out=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.result["final_upper_loss"] < 0.8 * records[0]["upper_loss"]
    assert result.result["report"]["test_accuracy"] > 0.9


def test_python_api_example(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("python_api_example", ROOT / "examples" / "python_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(steps=60, out=str(tmp_path))
    strengths = torch.exp(torch.tensor(result.result["upper_variables"]["lam"]))
    # the three informative features end up far less regularized than the nine noise features
    assert strengths[:3].max() < strengths[3:].median()
