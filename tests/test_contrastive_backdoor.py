"""The contrastive backdoor (Sun et al. 2024, BLTO): SimCLR's InfoNCE and augmentations, the
poisoned images of the target class, the trigger's hypergradient through the contrastive victim's
training (against finite differences), the budget kept by what a run writes, the linear-probe
report and its comparison rows, and clear errors for a budget the target class cannot hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bilevel
from bilevel import build_engine, compile_spec
from bilevel.cli import app
from bilevel.engines import UnrolledConfig
from bilevel.presets import find_preset
from bilevel.spec import load_spec
from problems.poison import PoisonData, augment, checkerboard, contrastive_attack, corner_patch, info_nce, train, val
from problems.poison.contrastive import contrastive_encoder

runner = CliRunner()
PRESET = "poison/digits_contrastive_backdoor"
DATA = {"budget": {"fraction": 0.05, "epsilon": 0.2}, "attack": "contrastive_backdoor", "target": 0}


def test_info_nce_is_the_cross_entropy_of_the_positive_pair() -> None:
    """Two images, two views each: with z1 = z2 = e_1, e_2 (orthonormal) every view's positive
    has similarity 1 and its two negatives 0: loss = -log(e^(1/t) / (e^(1/t) + 2))."""
    z = torch.eye(2, dtype=torch.float64)
    t = 0.5
    assert float(info_nce(z, z, t)) == pytest.approx(-math.log(math.exp(1 / t) / (math.exp(1 / t) + 2)), abs=1e-12)
    assert float(info_nce(3 * z, z, t)) == pytest.approx(float(info_nce(z, z, t)), abs=1e-12)  # normalized
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert float(info_nce(z, swapped, t)) > float(info_nce(z, z, t))  # positives that disagree cost more


def test_augmentations_are_random_views_in_range_and_differentiable() -> None:
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    first = augment(x, torch.Generator().manual_seed(0))
    assert first.shape == x.shape and float(first.detach().min()) >= 0 and float(first.detach().max()) <= 1
    assert torch.equal(first, augment(x, torch.Generator().manual_seed(0)))  # seeded: reproducible
    assert not torch.equal(first, augment(x, torch.Generator().manual_seed(1)))
    (grad,) = torch.autograd.grad(first.sum(), x)
    assert float(grad.abs().sum()) > 0  # a trigger added before the views gets gradients through them


def test_the_contrastive_attack_poisons_images_of_the_target_class_without_relabeling() -> None:
    data = train(**DATA)
    settings = PoisonData.model_validate(DATA)
    clean = settings.split()["train"]
    assert torch.equal(data["y"], clean["y"])  # no label changes: the victim sees none anyway
    poisoned = data["poisoned"]
    assert int(poisoned.sum()) == round(0.05 * 600) and bool((clean["y"][poisoned] == 0).all())
    assert bool((data["epsilon"][poisoned] == 0.2).all()) and bool((data["epsilon"][~poisoned] == 0).all())
    references = val(**DATA)
    assert {0, 1} <= set(references["y"].tolist())  # the attacker's references and the images to trigger


def test_a_budget_larger_than_the_target_class_is_a_spec_error() -> None:
    result = runner.invoke(app, ["validate", PRESET, "--set", "levels.lower.data.kwargs.budget.fraction=0.3"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert any("levels.lower.data.kwargs.budget.fraction" in line and "images of the target class" in line for line in errors), result.output


def test_the_trigger_hypergradient_through_the_contrastive_training_matches_finite_differences() -> None:
    """float64, 150 training images in one batch, T = 3 unrolled SGD steps of SimCLR: the unrolled
    hypergradient is the derivative of F(theta_3(z), z) along a random direction, with the
    augmentations drawn identically (seeded) at every evaluation."""
    loaded = load_spec(find_preset(PRESET), overrides=[
        "run.dtype=float64", "run.device=cpu", "report=null", "levels.lower.data.kwargs.n_train=150",
        "levels.lower.data.batch_size=null", "levels.lower.solver={name: momentum, lr: 0.1, momentum: 0.9, steps: 3}"])
    problem = compile_spec(loaded)
    engine = build_engine(UnrolledConfig())
    gen = torch.Generator().manual_seed(1)
    x = tuple(0.8 * (2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1) for p in problem.upper.init)
    direction = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in x)

    def run(point):
        torch.manual_seed(7)  # the same views in every call
        return engine.hypergrad(problem, point, engine.init(problem, point), problem.upper.batch())

    result = run(x)
    step = 1e-5
    plus = float(run(tuple(p + step * d for p, d in zip(x, direction))).upper_loss)
    minus = float(run(tuple(p - step * d for p, d in zip(x, direction))).upper_loss)
    numeric = (plus - minus) / (2 * step)
    analytic = sum(float((g * d).sum()) for g, d in zip(result.grad, direction))
    assert abs(numeric) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_a_contrastive_run_keeps_its_budget_and_raises_the_similarity(tmp_path: Path) -> None:
    """A short run: the poisoned images it writes stay within the budget (checked against clean
    data loaded here), the report has every trigger's row, and at the surrogate victim it ends
    with the optimized trigger has a lower upper loss (minus the cosine similarity of triggered
    images to the target class) than no trigger and the fixed triggers."""
    overrides = ["run.steps=30", "run.device=cpu", "run.checkpoint_every=null", "report_kwargs.models=1", "report_kwargs.steps=5",
                 "levels.lower.solver.steps=3"]
    result = bilevel.run(load_spec(find_preset(PRESET), overrides=overrides), out=tmp_path, progress=False)
    report = result.result["report"]
    assert report["budget_respected"] and report["poisoned_examples"] == 30
    assert 0 < report["max_perturbation"] <= 0.2 + 1e-6
    written = dict(np.load(tmp_path / "trigger.npz"))
    clean = PoisonData.model_validate(DATA).split()["train"]
    change = (torch.from_numpy(written["poisoned_x"]) - clean["x"]).abs()
    assert float(change.max()) <= 0.2 + 1e-6 and int((change.reshape(600, -1).amax(1) > 0).sum()) <= 30
    assert bool((clean["y"][torch.from_numpy(written["index"])] == 0).all())
    for key in ("optimized_trigger", "corner_patch", "checkerboard", "random_signs", "no_poisoning"):
        assert 0 <= report[f"{key}_attack_success"]["mean"] <= 1 and 0 <= report[f"{key}_accuracy"]["mean"] <= 1
    # at the surrogate victim the run ends with, the optimized trigger brings triggered images closer
    # to the target class (a lower F) than no trigger and than the fixed patterns of the same budget
    problem = compile_spec(load_spec(find_preset(PRESET), overrides=overrides))
    batch = problem.upper.batch()

    def upper_loss(trigger: torch.Tensor) -> float:
        torch.manual_seed(3)
        return sum(float(problem.upper_objective((trigger,), result.y, batch)) for _ in range(5)) / 5

    optimized = upper_loss(result.x[0])
    for fixed in (torch.zeros(1, 1, 8, 8), checkerboard((1, 8, 8)), corner_patch((1, 8, 8))):
        assert optimized < upper_loss(fixed) - 0.05
    assert "| corner patch (BadNets, 3x3) |" in (tmp_path / "attack.md").read_text()


def test_the_probe_measures_a_clean_victim() -> None:
    """A few SimCLR steps already give a linear probe far above chance, and a trigger evaluated on
    victims trained without poison rarely sends images to the target."""
    settings = PoisonData.model_validate(DATA)
    scores = contrastive_attack(settings, corner_patch((1, 8, 8)), models=1, steps=30, poisoned=False)
    assert scores["accuracy"]["mean"] > 0.8
    assert scores["attack_success"]["mean"] < 0.2
    assert contrastive_attack(settings, corner_patch((1, 8, 8)), models=0) == {}
    features = contrastive_encoder()(torch.rand(3, 1, 8, 8))
    assert features.shape == (3, 64)


def test_the_contrastive_table_has_every_row() -> None:
    from problems.poison.compare import contrastive_table

    def report(success: float) -> dict:
        keys = ["optimized_trigger", "corner_patch", "checkerboard", "random_signs", "no_poisoning", "supervised_trigger"]
        out = {f"{k}_{m}": {"mean": success, "std": 0.0} for k in keys for m in ("accuracy", "attack_success")}
        return {**out, "supervised_victim_accuracy": 0.9, "supervised_victim_attack_success": 0.8}

    table = contrastive_table([report(0.25), report(0.75)])
    lines = table.splitlines()
    assert lines[2].startswith("| optimized trigger (through the contrastive victim) | 0.500 ± 0.354 | 0.500 ± 0.354 |")
    assert lines[3].startswith("| trigger optimized through the supervised victim (poison/digits_backdoor) |")
    assert "BadNets" in table and "none (clean training" in table and "attack success 0.800 ± 0.000" in table


@pytest.mark.slow
def test_the_comparison_has_the_supervised_trigger_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from problems.poison import compare

    out = tmp_path / "c.json"
    assert compare.main(["--seeds", "0", "--steps", "2", "--models", "1", "--victim-steps", "5", "--attacks",
                         "contrastive_backdoor", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| trigger optimized through the supervised victim (poison/digits_backdoor) |" in printed
    report = json.loads(out.read_text())["contrastive_backdoor"][0]
    assert 0 <= report["supervised_trigger_attack_success"]["mean"] <= 1 and report["budget_respected"]


@pytest.mark.slow
def test_readme_contrastive_comparison_over_three_seeds() -> None:
    """The README's contrastive table (3 seeds, the preset's settings): the optimized trigger's
    attack success on fresh SimCLR victims is above every fixed trigger's and above the
    supervised victim's trigger in the mean over seeds, at a clean probe accuracy within 2 points."""
    from statistics import mean

    from problems.poison.compare import contrastive_run

    reports = [contrastive_run(seed, 200, 2, "cpu", None, None) for seed in (0, 1, 2)]

    def success(key: str) -> float:
        return mean(r[f"{key}_attack_success"]["mean"] for r in reports)

    for other in ("corner_patch", "checkerboard", "random_signs", "supervised_trigger"):
        assert success("optimized_trigger") > success(other), other
    assert mean(r["optimized_trigger_accuracy"]["mean"] for r in reports) > mean(r["corner_patch_accuracy"]["mean"] for r in reports) - 0.02
