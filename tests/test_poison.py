"""Data poisoning: the budget is validated at its dotted path and never exceeded by what a run
writes (even with a reckless outer step), hypergradients are right, the optimized attacks beat
their baselines at the same budget, and bad shapes are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bilevel
from bilevel import build_engine, compile_spec, make_plan
from bilevel.cli import app
from bilevel.presets import find_preset
from bilevel.spec import ImplicitConfig, LinearSolverSpec, UnrolledConfig, load_spec
from problems.poison import PoisonBudget, apply_perturbation, train

runner = CliRunner()
QUICK = ["run.device=cpu", "report_kwargs.models=0"]


def _loaded(preset: str, *overrides: str):
    return load_spec(find_preset(preset), overrides=list(overrides))


def _validate(preset: str, *overrides: str):
    args = ["validate", preset]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("error:")], result.output


@pytest.mark.parametrize(
    ("budget", "field", "message"),
    [
        ("{fraction: 1.5, epsilon: 0.5}", "budget.fraction", "less than or equal to 1"),
        ("{fraction: -0.1, epsilon: 0.5}", "budget.fraction", "greater than or equal to 0"),
        ("{fraction: 0.2, epsilon: -0.5}", "budget.epsilon", "greater than or equal to 0"),
        ("{fraction: 0.2}", "budget.epsilon", "required field is missing"),
        ("{fraction: 0.2, epsilon: 0.5, eps: 1}", "budget.eps", "unknown argument of problems.poison:train"),
    ],
)
def test_a_budget_out_of_range_is_a_spec_error(budget: str, field: str, message: str) -> None:
    """Each place the budget is used reports it at its own dotted path; exit code 2."""
    overrides = [f"{where}.budget={budget}" for where in ("levels.upper.data.kwargs", "levels.lower.data.kwargs",
                                                          "levels.upper.variables.delta.init_kwargs", "report_kwargs.data")]
    code, errors, output = _validate("poison/digits_availability", *overrides)
    assert code == 2 and "Traceback" not in output
    assert any(f"levels.lower.data.kwargs.{field}:" in line and message in line for line in errors), output
    assert any(f"levels.upper.variables.delta.init_kwargs.{field}:" in line for line in errors), output


@pytest.mark.parametrize(
    ("preset", "overrides", "path", "message"),
    [
        ("poison/digits_availability", ["levels.upper.variables.delta.shape=[500, 1, 8, 8]"],
         "levels.upper.variables.delta.init", "expected [500, 1, 8, 8]"),
        ("poison/digits_availability", ["levels.upper.variables.delta={shape: [600, 64], init: zeros}"],
         "levels.upper.variables.delta.shape", "expected [600, 1, 8, 8]"),
        ("poison/digits_backdoor", ["levels.upper.variables.trigger={shape: [1, 8, 8], init: zeros}"],
         "levels.upper.variables.trigger.shape", "expected [1, 1, 8, 8]"),
    ],
)
def test_a_perturbation_of_the_wrong_shape_is_a_spec_error(preset: str, overrides: list[str], path: str, message: str) -> None:
    code, errors, output = _validate(preset, *overrides)
    assert code == 2, output
    assert any(f"{path}:" in line and message in line for line in errors), output


def test_budget_model_counts_and_the_mask_matches_it() -> None:
    budget = PoisonBudget(fraction=0.25, epsilon=0.1)
    data = train(budget={"fraction": 0.25, "epsilon": 0.1})
    assert int(data["poisoned"].sum()) == budget.count(600) == 150
    assert torch.equal(data["epsilon"] > 0, data["poisoned"])
    backdoor = train(budget={"fraction": 0.1, "epsilon": 0.1}, attack="backdoor", target=3)
    assert (backdoor["y"][backdoor["poisoned"]] == 3).all()


def _check_written_poisons(npz: Path, key_clean: str = "clean", key_poisoned: str = "poisoned") -> None:
    with np.load(npz) as files:
        clean, poisoned = files[key_clean], files[key_poisoned]
        epsilon, fraction, n_train = float(files["epsilon"]), float(files["fraction"]), int(files["n_train"])
    assert clean.shape == poisoned.shape and clean.shape[0] <= round(fraction * n_train)
    assert np.abs(poisoned - clean).max() <= epsilon + 1e-6
    assert poisoned.min() >= 0.0 and poisoned.max() <= 1.0


def test_availability_run_never_exceeds_its_budget(tmp_path: Path) -> None:
    """Even with a huge outer step the written poisons stay within epsilon, in [0, 1], and on
    at most the budget's fraction of the training set; result.json says so too."""
    loaded = _loaded("poison/digits_availability", "run.steps=3", "levels.upper.solver.lr=100.0", *QUICK)
    result = bilevel.run(loaded, out=tmp_path, progress=False)
    report = result.result["report"]
    assert report["budget_respected"] and report["poisoned_examples"] <= 120
    assert report["max_perturbation"] == pytest.approx(0.5)  # the step saturates the box: the bound is attained
    _check_written_poisons(tmp_path / "poisons.npz")
    delta = torch.tensor(json.loads((tmp_path / "result.json").read_text())["upper_variables"]["delta"])
    assert delta.abs().max() <= 1.0  # the projection onto the declared box
    data = train(budget={"fraction": 0.2, "epsilon": 0.5})
    changed = (apply_perturbation(data["x"], delta, data["epsilon"]) != data["x"]).flatten(1).any(1)
    assert not changed[~data["poisoned"]].any()
    for name in ("poisons.png", "perturbations.png", "attack.md", "attack.json"):
        assert (tmp_path / name).exists()


def test_backdoor_run_never_exceeds_its_budget(tmp_path: Path) -> None:
    loaded = _loaded("poison/digits_backdoor", "run.steps=3", "levels.upper.solver.lr=100.0", *QUICK)
    result = bilevel.run(loaded, out=tmp_path, progress=False)
    assert result.result["report"]["budget_respected"]
    _check_written_poisons(tmp_path / "trigger.npz")
    with np.load(tmp_path / "trigger.npz") as files:
        assert np.abs(files["trigger"]).max() <= float(files["epsilon"]) + 1e-7
    for name in ("trigger.png", "triggered.png", "attack.md", "attack.json"):
        assert (tmp_path / name).exists()


@pytest.mark.parametrize("preset", ["poison/digits_availability", "poison/digits_backdoor"])
def test_implicit_hypergradient_matches_finite_differences(preset: str) -> None:
    """Float64, inner solve converged, at a random interior point of the box (away from the
    clipping kinks): implicit hypergradient vs a central difference along a random direction."""
    small = [f"{where}.n_train=150" for where in ("levels.upper.data.kwargs", "levels.lower.data.kwargs",
                                                  f"levels.upper.variables.{'delta' if 'availability' in preset else 'trigger'}.init_kwargs")]
    if "availability" in preset:
        small.append("levels.upper.variables.delta.shape=[150, 1, 8, 8]")
    loaded = _loaded(preset, "run.dtype=float64", "run.device=cpu", "report=null", *small,
                     "levels.lower.solver={name: momentum, lr: 1.0, momentum: 0.9, steps: 600, warm_start: false}")
    problem = compile_spec(loaded)
    engine = build_engine(ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=300, tol=1e-14)))
    gen = torch.Generator().manual_seed(1)
    x = tuple(0.8 * (2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1) for p in problem.upper.init)
    direction = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in x)

    def run(point):
        return engine.hypergrad(problem, point, engine.init(problem, point), problem.upper.batch())

    result = run(x)
    assert result.stats.inner_residual < 1e-9
    step = 1e-5
    plus = float(run(tuple(p + step * d for p, d in zip(x, direction))).upper_loss)
    minus = float(run(tuple(p - step * d for p, d in zip(x, direction))).upper_loss)
    numeric = (plus - minus) / (2 * step)
    analytic = sum(float((g * d).sum()) for g, d in zip(result.grad, direction))
    assert analytic == pytest.approx(numeric, rel=1e-4)


def test_unrolled_engine_runs_the_availability_preset(tmp_path: Path) -> None:
    loaded = _loaded("poison/digits_availability", "run.steps=2", "levels.lower.solver.steps=10", "report=null", "run.device=cpu")
    result = bilevel.run(loaded, engine=UnrolledConfig(), out=tmp_path, progress=False)
    assert result.result["engine"] == "unrolled" and result.result["steps"] == 2
    plan = make_plan(loaded, compile_spec(loaded))
    assert plan.engine.kind == "implicit"


def test_optimized_attacks_beat_their_baselines(tmp_path: Path) -> None:
    """At the presets' budgets (shortened to 40 outer steps, linear victims): the optimized
    poisons lower test accuracy more than random noise and label flips, and the optimized
    trigger succeeds far more often than the corner patch and the random pattern."""
    availability = bilevel.run(_loaded("poison/digits_availability", "run.steps=40", *QUICK), out=tmp_path / "a",
                               progress=False).result["report"]
    optimized = availability["optimized_poisons_linear_accuracy"]
    assert optimized < availability["random_noise_linear_accuracy"] - 0.02
    assert optimized < availability["label_flip_linear_accuracy"] - 0.02
    backdoor = bilevel.run(_loaded("poison/digits_backdoor", "run.steps=40", *QUICK), out=tmp_path / "b",
                           progress=False).result["report"]
    success = backdoor["optimized_trigger_linear_attack_success"]
    assert success > backdoor["corner_patch_linear_attack_success"] + 0.3
    assert success > backdoor["random_pattern_linear_attack_success"] + 0.3
    assert backdoor["optimized_trigger_linear_accuracy"] > backdoor["corner_patch_linear_accuracy"] - 0.02


def test_compare_script_runs_and_checks_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from problems.poison import compare

    out = tmp_path / "poison.json"
    assert compare.main(["--seeds", "0", "--steps", "2", "--models", "0", "--attacks", "backdoor", "--json", str(out)]) == 0
    assert "| corner patch |" in capsys.readouterr().out
    assert json.loads(out.read_text())["backdoor"][0]["budget_respected"]


@pytest.mark.slow
def test_readme_comparison_over_three_seeds() -> None:
    """The README's tables (3 seeds): on average the optimized poisons hurt the linear victim
    more than noise and label flips, and the optimized trigger succeeds more often than the
    corner patch and the random pattern, on both victims."""
    from statistics import mean

    from problems.poison.compare import run_attack

    availability = [run_attack("poison/digits_availability", seed, 100, 3, "cpu", None) for seed in (0, 1, 2)]
    optimized = mean(r["optimized_poisons_linear_accuracy"] for r in availability)
    assert optimized < mean(r["random_noise_linear_accuracy"] for r in availability) - 0.03
    assert optimized < mean(r["label_flip_linear_accuracy"] for r in availability) - 0.03
    backdoor = [run_attack("poison/digits_backdoor", seed, 100, 3, "cpu", None) for seed in (0, 1, 2)]
    for victim in ("linear", "mlp"):
        def success(key: str) -> float:
            values = [r[f"{key}_{victim}_attack_success"] for r in backdoor]
            return mean(v["mean"] if isinstance(v, dict) else v for v in values)

        assert success("optimized_trigger") > success("corner_patch") + 0.2
        assert success("optimized_trigger") > success("random_pattern") + 0.05
