"""Closed-form lower solutions (``solution``), init functions with keyword arguments, and user
code that reports a bad argument or a bad variable at its dotted path in the spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bilevel import build_engine, compile_spec, make_plan
from bilevel.engines import UnrolledConfig
from bilevel.spec import SpecError, spec_from_data
from problems.toy import ridge_data, ridge_hypergrad, ridge_spec, ridge_val_data

HERE = Path(__file__).parent
USER = "runtime_data/closed_form.py"


def _closed_form_spec(**changes) -> dict:
    data = ridge_spec(per_feature=True, inner_steps=3).model_dump(mode="json")
    lower = data["levels"]["lower"]
    lower["solution"] = f"{USER}:solution"
    del lower["solver"]  # a closed form needs no inner solver
    for key, value in changes.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return data


def _loaded(data: dict):
    return spec_from_data(data, base_dir=HERE)


def _hypergrad(loaded, config):
    problem = compile_spec(loaded)
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    return problem, engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


def test_closed_form_gives_the_exact_ridge_hypergradient() -> None:
    """Implicit differentiation at the closed-form solution = the analytic hypergradient (float64)."""
    loaded = _loaded(_closed_form_spec())
    problem = compile_spec(loaded)
    plan = make_plan(problem)
    assert plan.engine.kind == "implicit" and plan.engine.linear_solver.method == "direct"
    assert "closed form" in plan.reasons[0]
    _, result = _hypergrad(loaded, plan.engine)
    expected = ridge_hypergrad(torch.full((10,), -1.0, dtype=torch.float64), ridge_data(), ridge_val_data())
    torch.testing.assert_close(result.grad[0], expected, rtol=1e-10, atol=1e-13)
    assert float(result.stats.inner_residual) < 1e-12


def test_closed_form_is_what_every_lower_solve_returns() -> None:
    from bilevel.engines.inner import solve_lower
    from bilevel.optim import InnerOptimizer

    problem = compile_spec(_loaded(_closed_form_spec()))
    optimizer = InnerOptimizer(problem.lower.solver)
    y0 = problem.fresh(problem.lower.init)
    y, _ = solve_lower(problem, optimizer, problem.upper.init, y0, optimizer.init(y0), steps=1)
    expected = torch.linalg.solve(
        ridge_data()["X"].T @ ridge_data()["X"] / 40 + torch.exp(torch.tensor(-1.0, dtype=torch.float64)) * torch.eye(10, dtype=torch.float64),
        ridge_data()["X"].T @ ridge_data()["t"] / 40,
    )
    torch.testing.assert_close(y[0], expected)
    same, _ = solve_lower(problem, optimizer, problem.upper.init, y0, optimizer.init(y0), steps=0)
    assert same[0] is y0[0] or torch.equal(same[0], y0[0])  # zero steps asked: nothing solved


def test_unrolled_on_a_closed_form_gets_a_warning() -> None:
    loaded = _loaded(_closed_form_spec(**{"levels.lower.solver": {"name": "sgd", "lr": 0.2, "steps": 50}}))
    plan = make_plan(compile_spec(loaded), UnrolledConfig())
    assert any("closed form" in warning for warning in plan.warnings)


@pytest.mark.parametrize(("ref", "message"), [("wrong_name", "expected a mapping with the variables ['w']"),
                                              ("wrong_shape", "expected a floating-point Tensor of shape [10]")])
def test_a_wrong_closed_form_is_a_spec_error(ref: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        compile_spec(_loaded(_closed_form_spec(**{"levels.lower.solution": f"{USER}:{ref}"})))
    assert "levels.lower.solution" in str(info.value) and message in str(info.value)


def test_a_closed_form_needs_tensor_variables() -> None:
    data = _closed_form_spec(**{"levels.lower.variables": {"net": {"kind": "module", "factory": "torch.nn:Linear",
                                                                   "kwargs": {"in_features": 10, "out_features": 1}}}})
    with pytest.raises(SpecError) as info:
        compile_spec(_loaded(data))
    assert "levels.lower.solution" in str(info.value) and "module variable" in str(info.value)


def test_init_function_receives_init_kwargs() -> None:
    data = _closed_form_spec(**{"levels.upper.variables.lam": {"shape": [10], "init": f"{USER}:filled", "init_kwargs": {"value": -2.0}}})
    problem = compile_spec(_loaded(data))
    torch.testing.assert_close(problem.upper.init[0], torch.full((10,), -2.0, dtype=torch.float64))


def test_pydantic_errors_of_init_kwargs_name_their_dotted_path() -> None:
    data = _closed_form_spec(**{"levels.upper.variables.lam": {"shape": [10], "init": f"{USER}:filled",
                                                               "init_kwargs": {"value": 1.5, "size": 0}}})
    with pytest.raises(SpecError) as info:
        compile_spec(_loaded(data))
    paths = {issue.path for issue in info.value.issues}
    assert paths == {"levels.upper.variables.lam.init_kwargs.value", "levels.upper.variables.lam.init_kwargs.size"}
    assert "less than or equal to 0" in str(info.value)


def test_init_kwargs_need_an_init_function() -> None:
    with pytest.raises(SpecError) as info:
        _loaded(_closed_form_spec(**{"levels.upper.variables.lam": {"shape": [10], "init": 0.0, "init_kwargs": {"value": 1}}}))
    assert "levels.upper.variables.lam" in str(info.value) and "init_kwargs" in str(info.value)


def test_variable_error_is_reported_at_the_variable() -> None:
    data = _closed_form_spec(**{"levels.lower.objective": f"{USER}:picky_lower", "levels.upper.variables.lam": {"shape": [3]}})
    with pytest.raises(SpecError) as info:
        compile_spec(_loaded(data))
    (issue,) = [i for i in info.value.issues if "lam" in i.path]
    assert issue.path == "levels.upper.variables.lam.shape" and "expected [10]" in issue.message
