"""Dataset distillation: exact hypergradients (KIP and KRR-ST against autograd through
torch.linalg.solve, the trained student against finite differences), every preset through a short
run and its outputs, the distilled set beating random real subsets, clear errors for bad input,
and every row of the comparison a printed ``bilevel run`` command."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bilevel
from bilevel import build_engine, compile_spec, make_plan
from bilevel.cli import app
from bilevel.presets import find_preset
from bilevel.engines import ImplicitConfig, LinearSolverSpec
from bilevel.spec import load_spec
from problems.distill import kernel, real_images, real_train, ssl_targets

runner = CliRunner()
QUICK_REPORT = ["report_kwargs.models=1", "report_kwargs.eval_steps=20"]


def _loaded(preset: str, *overrides: str):
    return load_spec(find_preset(preset), overrides=list(overrides))


def _hypergrad(loaded, config=None, x=None):
    problem = compile_spec(loaded)
    config = config or make_plan(problem).engine
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init) if x is None else x
    return problem, engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


def _krr_reference(images: torch.Tensor, targets: torch.Tensor, real: dict[str, torch.Tensor], kernel_name: str,
                   reg: float = 1e-3) -> torch.Tensor:
    """F = 1/(2 n) ||K_ts (K_ss + lam I)^{-1} Y_s - Y_t||^2 written out with torch.linalg.solve,
    lam = reg tr(K_ss) / n_s, differentiable by autograd."""
    gram = kernel(images, images, kernel_name)
    n = gram.shape[0]
    regularized = gram + reg * torch.diagonal(gram).sum() / n * torch.eye(n, dtype=torch.float64)
    alpha = torch.linalg.solve(regularized, targets)
    residual = kernel(real["x"].double(), images, kernel_name) @ alpha - real["target"].double()
    return 0.5 * (residual**2).sum(1).mean()


def _check_against_autograd(problem, result, loss: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> None:
    assert result.stats.linear_residual < 1e-10
    expected = torch.autograd.grad(loss, (images, targets))
    assert float(result.upper_loss) == pytest.approx(float(loss.detach()), rel=1e-12)
    for name, reference in zip(("images", "targets"), expected):
        assert float(reference.abs().max()) > 1e-8  # a gradient that is not 0 == 0
        torch.testing.assert_close(result.grad[problem.upper.tensors[name]], reference, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kernel_name", ["nngp", "rbf"])
def test_krr_hypergradient_equals_autograd_through_solve(kernel_name: str) -> None:
    """KIP: closed-form lower solution + implicit engine (direct solve) = autograd through
    torch.linalg.solve, for the images and the learned labels (float64)."""
    kw = [f"levels.{level}.{field}.kernel_name={kernel_name}" for level, field in
          [("upper", "objective_kwargs"), ("lower", "objective_kwargs"), ("lower", "solution_kwargs")]]
    loaded = _loaded("distill/digits_kip", "run.dtype=float64", "run.device=cpu", *kw)
    problem, result = _hypergrad(loaded)
    images = real_images(per_class=1).double().requires_grad_(True)
    targets = torch.eye(10, dtype=torch.float64).requires_grad_(True)
    loss = _krr_reference(images, targets, real_train(targets="one_hot"), kernel_name)
    _check_against_autograd(problem, result, loss, images, targets)


def test_krr_st_hypergradient_equals_autograd_through_solve() -> None:
    """KRR-ST: the same exactness with the self-supervised teacher's representations as the real
    targets and learned target representations upstairs (a quicker teacher, the same one in
    every place it is used)."""
    # targets.init_kwargs is an alias of the images' (&subset), whose init takes no ssl_steps:
    # replaced whole, so that only the teacher's copy gains the argument
    quick = ["levels.upper.data.kwargs.ssl_steps=200",
             "levels.upper.variables.targets.init_kwargs={per_class: 1, subset_seed: 0, ssl_steps: 200}"]
    loaded = _loaded("distill/digits_krr_st", "run.dtype=float64", "run.device=cpu", "report=null", *quick)
    problem, result = _hypergrad(loaded)
    images = real_images(per_class=1).double().requires_grad_(True)
    targets = ssl_targets(per_class=1, ssl_steps=200).double().requires_grad_(True)
    real = real_train(targets="self_supervised", ssl_steps=200)
    assert real["target"].shape == (1000, 32) and targets.shape == (10, 32)
    _check_against_autograd(problem, result, _krr_reference(images, targets, real, "nngp"), images, targets)


def test_student_hypergradient_matches_finite_differences() -> None:
    """Implicit hypergradient through the linear student (inner solve converged, float64) against
    a central difference of F(theta*(X)) along a random direction of the images."""
    loaded = _loaded("distill/digits_implicit", "run.dtype=float64", "run.device=cpu", "report=null",
                     "levels.lower.solver={name: momentum, lr: 1.0, momentum: 0.9, steps: 600, warm_start: false}")
    config = ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=200, tol=1e-14))
    problem, result = _hypergrad(loaded, config)
    assert result.stats.inner_residual < 1e-9
    direction = torch.randn(problem.upper.init[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    step = 1e-4

    def loss_at(sign: float) -> float:
        shifted = (problem.upper.init[0] + sign * step * direction,)
        return float(_hypergrad(loaded, config, shifted)[1].upper_loss)

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * step)
    analytic = float((result.grad[0] * direction).sum())
    assert analytic == pytest.approx(numeric, rel=1e-5)


@pytest.mark.parametrize("preset", ["distill/digits_implicit", "distill/digits_unrolled", "distill/digits_kip"])
def test_preset_runs_and_writes_its_outputs(preset: str, tmp_path: Path) -> None:
    result = bilevel.run(_loaded(preset, "run.steps=3", "run.device=cpu", *QUICK_REPORT), out=tmp_path, progress=False)
    report = result.result["report"]
    assert report["images_per_class"] == 1 and len(report["distilled_accuracies"]) == 1
    assert 0.0 <= report["lower_solution_test_accuracy"] <= 1.0
    assert (tmp_path / "synthetic.png").stat().st_size > 1000
    table = json.loads((tmp_path / "accuracy.json").read_text())
    assert [row["training set"] for row in table][:2] == ["distilled (10 images)", "random real subset (10 images)"]
    assert "± " in (tmp_path / "accuracy.md").read_text()


def test_unrolled_preset_learns_labels_and_the_inner_learning_rate(tmp_path: Path) -> None:
    loaded = _loaded("distill/digits_unrolled", "run.steps=3", "run.device=cpu", "report=null")
    plan = make_plan(compile_spec(loaded))
    assert plan.engine.kind == "unrolled" and "tuned" in plan.reasons[0]
    result = bilevel.run(loaded, out=tmp_path, progress=False)
    final = result.result["upper_variables"]
    assert final["inner_lr"] != pytest.approx(0.3)
    assert not torch.allclose(torch.tensor(final["labels"]), 3.0 * torch.eye(10))


def test_krr_st_preset_runs_and_reports_transfer(tmp_path: Path) -> None:
    """The transfer evaluation works end to end: every linear probe on frozen features beats
    chance (0.1 on ten classes) by far. (Its hypergradient is checked exactly above.)"""
    overrides = ["run.steps=2", "run.device=cpu", "report_kwargs.models=1", "report_kwargs.pretrain_steps=10",
                 # a quicker teacher, the same one everywhere it is used
                 "levels.upper.data.kwargs.ssl_steps=200", "report_kwargs.data.ssl_steps=200",
                 "levels.upper.variables.targets.init_kwargs={per_class: 1, subset_seed: 0, ssl_steps: 200}"]
    result = bilevel.run(_loaded("distill/digits_krr_st", *overrides), out=tmp_path, progress=False)
    report = result.result["report"]
    for key in ("distilled_probe_accuracy", "random_real_subset_probe_accuracy", "no_pretraining_probe_accuracy", "teacher_probe_accuracy"):
        assert 0.4 < report[key]["mean"] <= 1.0, key
    assert (tmp_path / "synthetic.png").exists() and (tmp_path / "accuracy.md").exists()


def test_distilled_set_clearly_beats_random_real_subsets_at_one_image_per_class(tmp_path: Path) -> None:
    """The README's claim, shortened: 150 outer steps, 3 evaluation models."""
    result = bilevel.run(_loaded("distill/digits_implicit", "run.steps=150", "run.device=cpu", "report_kwargs.models=3"),
                         out=tmp_path, progress=False)
    report = result.result["report"]
    assert report["distilled_accuracy"]["mean"] > 0.85
    assert report["distilled_accuracy"]["mean"] > report["random_subset_accuracy"]["mean"] + 0.1


def test_cli_runs_a_distillation_preset(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "distill/digits_kip", "-q", "--out", str(out), "--set", "run.steps=2",
                                 *[arg for item in QUICK_REPORT for arg in ("--set", item)]])
    assert result.exit_code == 0, result.output
    assert "distilled_accuracy" in result.output
    assert json.loads((out / "result.json").read_text())["engine"] == "implicit"


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        (["levels.upper.variables.images={shape: [10, 64], init: normal}"], "levels.upper.variables.images.shape",
         "expected [n, 1, 8, 8]"),
        (["levels.upper.variables.images.init_kwargs.per_class=2"], "levels.upper.variables.images.init",
         "returned shape [20, 1, 8, 8], expected [10, 1, 8, 8]"),
        (["levels.upper.variables.images={shape: [12, 1, 8, 8], init: normal}"], "levels.upper.variables.images.shape",
         "do not split evenly into 10 classes"),
        (["levels.upper.variables.images.init_kwargs.per_class=0"], "levels.upper.variables.images.init_kwargs.per_class",
         "greater than or equal to 1"),
        (["levels.upper.variables.labels={shape: [10, 9]}"], "levels.upper.variables.labels.shape", "expected [10, 10]"),
        (["levels.upper.variables.images={shape: [10, 1, 16, 16], init: normal}"], "levels.upper.variables.images.shape",
         "but the real images are [1, 8, 8]"),
        (["levels.lower.variables.student.kwargs.in_shape=[1, 16, 16]"], "levels.lower.variables.student.kwargs.in_shape",
         "takes 256 values per image, but the real images are [1, 8, 8] (64 values): expected [1, 8, 8]"),
    ],
)
def test_bad_synthetic_sets_are_clear_errors(overrides: list[str], path: str, message: str) -> None:
    args = ["validate", "distill/digits_unrolled" if "labels" in path else "distill/digits_implicit"]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "RuntimeError" not in result.output  # no raw error after the clear one
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert any(path + ":" in line and message in line for line in errors), result.output


def test_compare_rows_are_the_bilevel_run_commands_it_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The comparison prints its table and writes JSON; each row records the command line of its
    run, which gives the same report through the CLI; ``--commands`` prints the same lines."""
    from problems.distill import compare

    out = tmp_path / "distill.json"
    args = ["--ipc", "1", "--methods", "kip", "--models", "1", "--steps", "2"]
    assert compare.main([*args, "--json", str(out)]) == 0
    assert "| 1 | KIP" in capsys.readouterr().out
    row = json.loads(out.read_text())["rows"][0]
    assert row["ipc"] == 1 and "kip random real subset" in row
    assert row["kip whole real pool"]["mean"] > row["kip random real subset"]["mean"] + 0.1  # 1000 real images vs 10
    assert compare.main([*args, "--commands"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    words = shlex.split(line)
    assert words[:3] == ["bilevel", "run", "distill/digits_kip"]
    words[words.index("--out") + 1] = str(tmp_path / "cli")
    assert shlex.join(words[:3] + words[5:]) == row["kip command"]
    result = runner.invoke(app, [*words[1:], "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cli" / "result.json").read_text())["report"]
    assert report["distilled_accuracy"] == pytest.approx(row["kip"])
    assert report["random_subset_accuracy"] == pytest.approx(row["kip random real subset"])


def test_timing_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "distill_timing.py"
    spec = importlib.util.spec_from_file_location("distill_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--device", "cpu", "--ipc", "1", "--students", "linear", "--inner-steps", "3", "--repeats", "1",
                        "--json", str(tmp_path / "t.json")])
    assert [row["method"] for row in rows] == ["implicit (CG 20)", "unrolled (3 steps)", "unrolled, checkpoint every 2"]
    assert rows[1]["cos_vs_implicit"] == pytest.approx(rows[2]["cos_vs_implicit"], abs=1e-5)  # checkpointing changes nothing


@pytest.mark.slow
def test_readme_comparison_distilled_sets_beat_random_subsets() -> None:
    """The README's table: every method's distilled set beats random real subsets of the same
    size, by far at 1 image per class (5 evaluation models, 300 outer steps)."""
    from problems.distill import compare

    results = compare.compare([1, 10], list(compare.METHODS), models=5, steps=300, device="cpu", log=lambda _m: None)
    for row in results["rows"]:
        for method in compare.METHODS:
            gain = row[method]["mean"] - row[f"{method} random real subset"]["mean"]
            assert gain > (0.15 if row["ipc"] == 1 else 0.02), (row["ipc"], method, gain)


def test_learned_inner_lr_and_labels_match_finite_differences() -> None:
    """Unrolling through the MLP student's 20 steps differentiates the tuned learning rate (a
    scalar multiplying a multi-tensor update), the soft labels and the images exactly (float64;
    a tanh student, since finite differences across ReLU kinks are not derivatives)."""
    loaded = _loaded("distill/digits_unrolled", "run.dtype=float64", "run.device=cpu", "report=null",
                     "levels.lower.variables.student.kwargs.activation=tanh")
    problem, result = _hypergrad(loaded)
    gen = torch.Generator().manual_seed(0)
    direction = tuple(torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in problem.upper.init)
    step = 1e-5

    def loss_at(sign: float) -> float:
        shifted = tuple(p + sign * step * d for p, d in zip(problem.upper.init, direction))
        return float(_hypergrad(loaded, x=shifted)[1].upper_loss)

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * step)
    analytic = sum(float((g * d).sum()) for g, d in zip(result.grad, direction))
    assert result.grad[problem.upper.tensors["inner_lr"]] != 0
    assert analytic == pytest.approx(numeric, rel=1e-6)
