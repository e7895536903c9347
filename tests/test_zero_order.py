"""Zero-order (evolution-strategies) hypergradients: unbiasedness on a quadratic, the reported
variance, agreement with TorchOpt's zero-order decorator where the definitions match, vmapped and
looped perturbations, and a lower level solved by an external (NumPy) solver."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bilevel import build_engine, compile_spec, make_plan, run
from bilevel.engines import UnrolledConfig, ZeroOrderConfig
from bilevel.engines.inner import lower_steps
from bilevel.optim import InnerOptimizer
from bilevel.spec import SpecError, spec_from_data
from problems.toy import quadratic_spec

STEPS = 20


def _quadratic() -> Any:
    """The toy quadratic with cold starts: f(x) = F(x, y_T(x)) is the same quadratic function of x
    at every call (y_T is affine in x after T gradient steps on G, and F is quadratic in (x, y))."""
    data = quadratic_spec(inner_steps=STEPS).model_dump(mode="json")
    data["levels"]["lower"]["solver"]["warm_start"] = False
    return compile_spec(spec_from_data(data))


def _exact(problem: Any, x: Any) -> torch.Tensor:
    """df/dx of the T-step map, by reverse-mode unrolling (float64)."""
    engine = build_engine(UnrolledConfig())
    return engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()).grad[0]


def _f(problem: Any, x: torch.Tensor) -> torch.Tensor:
    """f(x) = F(x, y_T(x)) through the shared inner loop."""
    optimizer = InnerOptimizer(problem.lower.solver)
    y0 = problem.fresh(problem.lower.init)
    batches = [problem.lower.batch() for _ in range(STEPS)]
    y, _, _ = lower_steps(problem, optimizer, (x.detach(),), y0, optimizer.init(y0), batches=batches)
    with torch.no_grad():
        return problem.upper_objective((x.detach(),), y, problem.upper.batch())


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
def test_estimates_are_unbiased_on_a_quadratic(method: str) -> None:
    """The ES estimator is unbiased for the gradient of the Gaussian smoothing f_sigma(x) =
    E f(x + sigma u); for a quadratic f, f_sigma - f is a constant (sigma^2 tr(H) / 2), so the
    estimate is unbiased for df/dx itself, at any sigma. With a fixed seed, the mean of 60
    estimates is within 4 standard errors of the exact derivative in every coordinate, and the
    variance the engine reports matches the spread of its estimates."""
    torch.manual_seed(0)
    problem = _quadratic()
    x = problem.fresh(problem.upper.init)
    exact = _exact(problem, x)
    engine = build_engine(ZeroOrderConfig(method=method, samples=24, sigma=0.5))
    state = engine.init(problem, x)
    results = [engine.hypergrad(problem, x, state, problem.upper.batch()) for _ in range(60)]
    estimates = torch.stack([r.grad[0] for r in results])
    mean, standard_error = estimates.mean(0), estimates.std(0) / len(results) ** 0.5
    assert bool(((mean - exact).abs() <= 4 * standard_error).all()), (mean, exact, standard_error)
    assert float((mean - exact).norm()) < 0.5 * float(exact.norm())  # and the test has power: the error is small
    reported = float(torch.tensor([float(r.stats.extra["estimate_variance"]) for r in results]).mean())
    observed = float(estimates.var(0).sum())
    assert 0.6 < reported / observed < 1.6
    assert results[0].stats.extra["lower_solves"] == (49 if method == "antithetic" else 25)


def test_orthogonal_antithetic_directions_are_exact_on_a_quadratic() -> None:
    problem = _quadratic()
    x = problem.fresh(problem.upper.init)
    engine = build_engine(ZeroOrderConfig(distribution="orthogonal", samples=6, sigma=0.1))
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    torch.testing.assert_close(result.grad[0], _exact(problem, x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
def test_vmapped_and_looped_perturbations_agree(method: str) -> None:
    problem = _quadratic()
    x = problem.fresh(problem.upper.init)
    out = []
    for vectorize in ("vmap", "loop"):
        torch.manual_seed(3)
        engine = build_engine(ZeroOrderConfig(method=method, samples=5, vectorize=vectorize))
        out.append(engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()))
        assert engine.execution_report() is None
    torch.testing.assert_close(out[0].grad[0], out[1].grad[0], rtol=1e-10, atol=1e-12)


# --- TorchOpt's zero-order decorator on the same function and samples ----------------------------
class _Replay:
    """A TorchOpt Samplable that hands out given directions in order (one per sample)."""

    def __init__(self, u: torch.Tensor):
        self.rows = iter(u)

    def sample(self, sample_shape: Any = torch.Size()) -> torch.Tensor:
        return next(self.rows).reshape(sample_shape)


def _torchopt(problem: Any, x: torch.Tensor, u: torch.Tensor, method: str, sigma: float) -> torch.Tensor:
    torchopt = pytest.importorskip("torchopt")

    @torchopt.diff.zero_order.zero_order(distribution=_Replay(u), method=method, num_samples=u.shape[0], sigma=sigma)
    def f(point: torch.Tensor) -> torch.Tensor:
        return _f(problem, point)

    leaf = x.detach().clone().requires_grad_(True)
    f(leaf).backward()
    return leaf.grad


@pytest.mark.parametrize("method", ["naive", "antithetic"])
def test_agrees_with_torchopt_where_the_definitions_match(method: str) -> None:
    problem = _quadratic()
    x = problem.fresh(problem.upper.init)
    sigma, samples = 0.3, 7
    torch.manual_seed(11)
    engine = build_engine(ZeroOrderConfig(method=method, samples=samples, sigma=sigma))
    ours = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()).grad[0]
    torch.manual_seed(11)
    u = torch.randn(samples, x[0].numel(), dtype=torch.float64)  # the directions the engine drew first
    torch.testing.assert_close(ours, _torchopt(problem, x[0], u, method, sigma), rtol=1e-12, atol=1e-13)


def test_torchopt_forward_differs_from_the_forward_difference_estimator() -> None:
    """TorchOpt 0.7.3's method="forward" (1) multiplies by sigma where the estimator divides by it,
    and (2) overwrites its baseline f(x) after each sample, so sample i uses b_i with b_1 = f(x),
    b_{i+1} = f(x + sigma u_i) - b_i. This checks that reading of its code; ours is
    1/(N sigma) sum_i (f(x + sigma u_i) - f(x)) u_i."""
    problem = _quadratic()
    x = problem.fresh(problem.upper.init)
    sigma, samples = 0.3, 5
    torch.manual_seed(5)
    engine = build_engine(ZeroOrderConfig(method="forward", samples=samples, sigma=sigma))
    ours = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()).grad[0]
    torch.manual_seed(5)
    u = torch.randn(samples, x[0].numel(), dtype=torch.float64)
    theirs = _torchopt(problem, x[0], u, "forward", sigma)
    values = torch.stack([_f(problem, x[0] + sigma * row) for row in u])
    base = _f(problem, x[0])
    torch.testing.assert_close(ours, ((values - base) / sigma).unsqueeze(1).mul(u).mean(0), rtol=1e-12, atol=1e-13)
    baseline, their_terms = base, []
    for value, row in zip(values, u):
        baseline = value - baseline
        their_terms.append(sigma * baseline * row)
    torch.testing.assert_close(theirs, torch.stack(their_terms).mean(0), rtol=1e-12, atol=1e-13)
    assert float((theirs - ours).norm()) > 0.1 * float(ours.norm())


# --- non-differentiable lower levels --------------------------------------------------------------
def test_an_external_solver_lower_level_falls_back_to_the_loop_and_is_tuned(tmp_path: Any) -> None:
    """Elastic net solved by NumPy coordinate descent (problems/elastic_net): vmap cannot run it,
    so the perturbations run in a loop (said in result.json); 25 zero-order steps bring the
    validation loss from its start to within 0.5% of the best of a 15 x 15 grid search."""
    from problems.elastic_net import enet_spec, grid_search

    spec = enet_spec(steps=25, samples=6)
    result = run(spec, out=tmp_path, progress=False)
    report = result.result["report"]
    start = run(enet_spec(steps=0), out=tmp_path / "start", progress=False).result["report"]
    best = grid_search(points=15)
    assert report["val_loss"] < start["val_loss"] and report["val_loss"] <= 1.005 * best["val_loss"]
    assert result.result["fast_path"]["perturbations"] == "loop" and "vmap" in result.result["fast_path"]["why"]
    assert not result.result["plan_warnings"]
    assert result.result["last_stats"]["lower_solves"] == 13


def test_gradient_engines_refuse_the_non_differentiable_strengths() -> None:
    from problems.elastic_net import enet_spec

    problem = compile_spec(enet_spec())
    with pytest.raises(SpecError) as info:
        make_plan(problem, UnrolledConfig())
    message = str(info.value)
    assert "levels.upper.variables.l1" in message and "differentiable: false" in message and "zero_order" in message


def test_a_sort_and_an_argmax_in_the_objectives() -> None:
    """A lower objective with a sort and an upper 0-1 term through an argmax
    (problems/toy/nondifferentiable.py): reverse mode sees only the rho x of the upper regularizer,
    the ES estimate also the smoothed 0-1 term, by far more than its standard error."""
    data = quadratic_spec(inner_steps=10).model_dump(mode="json")
    data["levels"]["lower"]["objective"] = "problems.toy.nondifferentiable:trimmed_lower"
    data["levels"]["upper"]["objective"] = "problems.toy.nondifferentiable:sign_error_upper"
    problem = compile_spec(spec_from_data(data))
    x = problem.fresh(problem.upper.init)
    reverse = build_engine(UnrolledConfig())
    through = reverse.hypergrad(problem, x, reverse.init(problem, x), problem.upper.batch()).grad[0]
    torch.testing.assert_close(through, 0.1 * x[0], rtol=1e-12, atol=1e-14)
    torch.manual_seed(0)
    engine = build_engine(ZeroOrderConfig(samples=2048, sigma=0.5))
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    difference = float((result.grad[0] - through).norm())
    assert difference > 5 * float(result.stats.extra["estimate_variance"]) ** 0.5


def test_a_bad_option_is_a_spec_error_at_its_path(tmp_path: Any) -> None:
    import yaml
    from typer.testing import CliRunner

    from bilevel.cli import app

    data = quadratic_spec(inner_steps=5).model_dump(mode="json")
    data["engine"] = {"kind": "zero_order", "method": "central", "samples": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "engine.zero_order.method" in result.output or "engine.method" in result.output, result.output
    assert "samples" in result.output and "spec.yaml" in result.output
