"""The batched QP engine (bilevel/engines/qp.py) and its interior-point solver (bilevel/linalg/qp.py):

* the solver meets the KKT conditions of random feasible QPs to 1e-10, and agrees with the
  closed form of an equality-constrained QP and of a QP whose active set is known;
* hypergradients through the KKT conditions equal central finite differences of F(x, y*(x)) in
  float64 (< 1e-6) with inequality constraints active, coupled inequality and equality
  constraints included; the value-function route equals the KKT route where F = G;
* a batch of instances gives each instance the hypergradient it gets alone (1e-10);
* the planar grasp toy reaches its known optimum;
* the planner picks the engine for a declared QP only, and bad input names its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel import run
from bilevel.compile import compile_spec
from bilevel.compile.instances import instance_specs
from bilevel.engines import QPConfig, build_engine
from bilevel.linalg.qp import solve_qp
from bilevel.planner import make_plan
from bilevel.spec import SpecError, spec_from_data
from problems.grasp import optimal_value, planar_grasp_spec

D = torch.float64


def _random_qps(N: int = 64, n: int = 5, m: int = 7, p: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(N, n, n, generator=gen, dtype=D)
    Q = M @ M.transpose(1, 2) + 0.1 * torch.eye(n, dtype=D)
    G = torch.randn(N, m, n, generator=gen, dtype=D)
    h = torch.rand(N, m, generator=gen, dtype=D)  # y = 0 is strictly feasible for the inequalities
    A = torch.randn(N, p, n, generator=gen, dtype=D)
    return Q, torch.randn(N, n, generator=gen, dtype=D), G, h, A, torch.zeros(N, p, dtype=D)


def test_the_interior_point_solution_meets_the_kkt_conditions() -> None:
    Q, q, G, h, A, b = _random_qps()
    sol = solve_qp(Q, q, G, h, A, b)
    stationarity = (Q @ sol.y[..., None]).squeeze(-1) + q + (G.transpose(1, 2) @ sol.z[..., None]).squeeze(-1) \
        + (A.transpose(1, 2) @ sol.nu[..., None]).squeeze(-1)
    slack = h - (G @ sol.y[..., None]).squeeze(-1)
    assert float(stationarity.abs().max()) < 1e-10
    assert float(slack.min()) > -1e-10 and float(sol.z.min()) >= 0
    assert float((slack * sol.z).abs().max()) < 1e-10
    assert float(((A @ sol.y[..., None]).squeeze(-1) - b).abs().max()) < 1e-10
    assert float(sol.residual.max()) < 1e-10
    active = (sol.z > 1e-8).sum()
    assert int(active) > 0  # the check is not vacuous: constraints are active somewhere


def test_an_equality_constrained_qp_matches_its_closed_form() -> None:
    Q, q, _, _, A, _ = _random_qps(N=4, p=2)
    b = torch.randn(4, 2, dtype=D)
    sol = solve_qp(Q, q, Q.new_zeros(4, 0, 5), Q.new_zeros(4, 0), A, b)
    kkt = torch.cat([torch.cat([Q, A.transpose(1, 2)], 2), torch.cat([A, Q.new_zeros(4, 2, 2)], 2)], 1)
    want = torch.linalg.solve(kkt, torch.cat([-q, b], 1)[..., None]).squeeze(-1)
    assert float((sol.y - want[:, :5]).abs().max()) < 1e-12
    assert float((sol.nu - want[:, 5:]).abs().max()) < 1e-12


def test_a_box_constrained_qp_matches_the_projection() -> None:
    # min 1/2 ||y - c||^2 s.t. y <= 1 (G = I, h = 1): y* = min(c, 1), z* = max(c - 1, 0)
    c = torch.tensor([[0.3, 2.0, -1.5, 1.7]], dtype=D)
    eye = torch.eye(4, dtype=D)[None]
    sol = solve_qp(eye, -c, eye, torch.ones(1, 4, dtype=D), eye.new_zeros(1, 0, 4), eye.new_zeros(1, 0))
    assert float((sol.y - c.clamp(max=1.0)).abs().max()) < 1e-10
    assert float((sol.z - (c - 1).clamp(min=0.0)).abs().max()) < 1e-10


# --- a small QP bilevel problem, known in closed form where its active set is -----------------------
def qp_lower(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
    """G(x, y) = 1/2 y^T P y - (B x)^T y, P = diag(1, 2, 3) + 0.5 (all ones)."""
    y, x = lower["y"], upper["x"]
    P = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=y.dtype)) + 0.5
    B = torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.2, -0.7]], dtype=y.dtype)
    return 0.5 * y @ (P @ y) - (B @ x) @ y


def qp_upper(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
    y, x = lower["y"], upper["x"]
    return 0.5 * ((y - torch.tensor([1.0, -1.0, 0.5], dtype=y.dtype)) ** 2).sum() + 0.05 * (x**2).sum()


def box(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
    """y <= 0.4 entrywise (uncoupled)."""
    return lower["y"] - 0.4


def coupled(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
    """y_1 + y_2 <= x_1 (coupled)."""
    return (lower["y"][0] + lower["y"][1] - upper["x"][0]).reshape(1)


def balance(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
    """sum(y) = 0.3 x_2 (coupled equality)."""
    return (lower["y"].sum() - 0.3 * upper["x"][1]).reshape(1)


def _qp_spec(constraints: list[dict[str, Any]], x0: list[float] | None = None, upper: str = "tests.test_qp:qp_upper",
             quadratic: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "name": "qp-toy",
        "levels": {
            "upper": {"variables": {"x": {"shape": [2], "init": 0.0 if x0 is None else x0}}, "objective": upper,
                      "solver": {"name": "sgd", "lr": 0.1}},
            "lower": {"parent": "upper", "variables": {"y": {"shape": [3]}}, "objective": "tests.test_qp:qp_lower",
                      "solver": {"name": "sgd", "lr": 0.1, "steps": 0},
                      "assumptions": {"convexity": "strongly_convex", "quadratic": quadratic},
                      "constraints": constraints},
        },
        "run": {"dtype": "float64", "device": "cpu", "steps": 1, "checkpoint_every": None},
        **extra,
    }


CONSTRAINTS = {
    "box": [{"fn": "tests.test_qp:box", "affine": True, "shape": [3]}],
    "coupled": [{"fn": "tests.test_qp:box", "affine": True},
                {"fn": "tests.test_qp:coupled", "affine": True, "coupled": True},
                {"fn": "tests.test_qp:balance", "kind": "equality", "affine": True, "coupled": True}],
}


def _hypergrad(data: dict[str, Any], config: QPConfig, x: list[float]) -> tuple[torch.Tensor, Any]:
    problem = compile_spec(spec_from_data(data))
    xs = (torch.tensor(x, dtype=D),)
    engine = build_engine(config)
    result = engine.hypergrad(problem, xs, engine.init(problem, xs), problem.upper.batch())
    return result.grad[0], result


def _value(data: dict[str, Any], x: list[float]) -> float:
    problem = compile_spec(spec_from_data(data))
    xs = (torch.tensor(x, dtype=D),)
    engine = build_engine(QPConfig(tol=1e-14, iterations=60))
    y = engine.lower_solution(problem, xs, engine.init(problem, xs))
    return float(problem.upper_objective(xs, y, problem.upper.batch()))


@pytest.mark.parametrize("case", ["box", "coupled"])
def test_kkt_hypergradient_matches_central_finite_differences(case: str) -> None:
    data = _qp_spec(CONSTRAINTS[case])
    x = [1.3, 0.8]
    grad, result = _hypergrad(data, QPConfig(), x)
    h = 1e-6
    fd = torch.tensor([(_value(data, [x[0] + h * (i == 0), x[1] + h * (i == 1)])
                        - _value(data, [x[0] - h * (i == 0), x[1] - h * (i == 1)])) / (2 * h) for i in range(2)], dtype=D)
    assert float((grad - fd).abs().max()) < 1e-6, (grad, fd)
    assert float(result.stats.inner_residual) < 1e-10 and float(result.stats.linear_residual) < 1e-10
    y = result.state.lower[0]
    assert float(y.max()) == pytest.approx(0.4, abs=1e-9)  # a constraint is active at this x: not the unconstrained case


def test_value_route_equals_the_kkt_route_when_f_is_the_lower_value() -> None:
    data = _qp_spec(CONSTRAINTS["coupled"], upper="tests.test_qp:qp_lower")
    kkt, _ = _hypergrad(data, QPConfig(), [1.3, 0.8])
    value, result = _hypergrad(data, QPConfig(gradient="value"), [1.3, 0.8])
    assert float((kkt - value).abs().max()) < 1e-9
    assert result.stats.linear_residual is None


def test_value_route_is_refused_when_f_is_not_the_lower_value() -> None:
    with pytest.raises(SpecError) as info:
        _hypergrad(_qp_spec(CONSTRAINTS["box"]), QPConfig(gradient="value"), [1.3, 0.8])
    assert info.value.issues[0].path == "engine.gradient"


def test_each_instance_of_a_batch_gets_its_own_hypergradient() -> None:
    data = _qp_spec(CONSTRAINTS["coupled"][:2])  # the equality would make the start y = 0 infeasible
    data["instances"] = {"count": 3, "vary": {"levels.upper.variables.x.init": [1.3, 0.2, 2.0]}}
    loaded = spec_from_data(data)
    batched = compile_spec(loaded)
    engine = build_engine(QPConfig())
    x = batched.fresh(batched.upper.init)
    together = engine.hypergrad(batched, x, engine.init(batched, x), batched.upper.batch())
    for k, one in enumerate(instance_specs(loaded)):
        single = compile_spec(one)
        xs = single.fresh(single.upper.init)
        alone = engine.hypergrad(single, xs, engine.init(single, xs), single.upper.batch())
        assert float((together.grad[0][k] - alone.grad[0]).abs().max()) < 1e-10


def test_the_planner_picks_qp_for_a_declared_qp_and_lv_hba_otherwise() -> None:
    plan = make_plan(compile_spec(spec_from_data(_qp_spec(CONSTRAINTS["coupled"]))))
    assert plan.engine.kind == "qp" and any("convex QP" in reason for reason in plan.reasons)
    not_declared = make_plan(compile_spec(spec_from_data(_qp_spec(CONSTRAINTS["coupled"], quadratic=False))))
    assert not_declared.engine.kind == "lv_hba"


def test_bad_input_is_named() -> None:
    # an objective declared quadratic that is not
    data = _qp_spec(CONSTRAINTS["box"])
    data["levels"]["lower"]["objective_kwargs"] = {}
    data["levels"]["lower"]["objective"] = "tests.test_qp:not_quadratic"
    with pytest.raises(SpecError) as info:
        _hypergrad(data, QPConfig(), [1.0, 0.0])
    assert info.value.issues[0].path == "levels.lower.objective"
    # asked for without the declarations: warned, and checked at the first step
    data = _qp_spec([{"fn": "tests.test_qp:box"}], quadratic=False, engine={"kind": "qp"})
    plan = make_plan(compile_spec(spec_from_data(data)))
    assert any("assumptions.quadratic" in w for w in plan.warnings) and any("affine" in w for w in plan.warnings)
    grad, _ = _hypergrad(data, QPConfig(), [1.3, 0.8])
    assert torch.isfinite(grad).all()


def not_quadratic(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
    return qp_lower(upper, lower, batch) + 0.1 * (lower["y"] ** 4).sum()


def test_the_cli_names_a_constraint_declared_affine_that_is_not(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bilevel.cli import app

    data = _qp_spec([{"fn": "tests.test_qp:curved", "affine": True}], engine={"kind": "qp"})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "levels.lower.constraints.0" in result.output and "affine" in result.output
    assert "Traceback" not in result.output


def curved(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
    return lower["y"] ** 2 - 0.4


# --- the planar grasp toy ------------------------------------------------------------------------
def test_the_grasp_toy_reaches_its_known_optimum(tmp_path: Path) -> None:
    result = run(planar_grasp_spec(count=32, steps=300, checkpoint_every=None), out=tmp_path, progress=False)
    assert result.result["engine"] == "qp"
    instances = result.result["instances"]
    gaps = [item["report"]["relative_gap"] for item in instances]
    best = [float(optimal_value(k)) for k in range(32)]
    assert [item["report"]["optimal_value"] for item in instances] == pytest.approx(best)
    assert min(gaps) > -1e-9  # v* is a lower bound: no grasp does better
    assert max(gaps) <= 1e-6  # every instance (the preset: 1024 of 1024, problems/grasp/README.md)


def test_the_grasp_hypergradient_matches_finite_differences() -> None:
    loaded = spec_from_data(planar_grasp_spec(count=2).model_dump(mode="json"))
    problem = compile_spec(loaded)
    engine = build_engine(QPConfig())
    x = problem.fresh(problem.upper.init)
    grad = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()).grad[0]

    def value(xx: torch.Tensor) -> float:
        y = engine.lower_solution(problem, (xx,), engine.init(problem, (xx,)))
        return float(problem.upper_objective((xx,), y, None))

    h = 1e-6
    for k in range(2):
        for i in range(3):
            e = torch.zeros_like(x[0])
            e[k, i] = h
            fd = (value(x[0] + e) - value(x[0] - e)) / (2 * h)
            assert abs(float(grad[k, i]) - fd) < 1e-6


def test_instances_vary_index_expands_to_the_instance_indices() -> None:
    spec = planar_grasp_spec(count=5)
    assert spec.instances.vary["levels.forces.objective_kwargs.instance"] == [0, 1, 2, 3, 4]


def test_a_large_batch_is_summarized_by_its_known_optimum_verdicts() -> None:
    from bilevel.reporting.optimum import batch_optimum_line, known_optimum

    reports = [{"known_optimum": known_optimum("v*", gap, 1e-6, "relative gap")} for gap in (1e-9, 3e-7, 2e-5)]
    line = batch_optimum_line([*reports, None])
    assert line == "known optimum v*: reached in 2 of 3 instances (largest relative gap 2e-05, tolerance 1e-06)"
    assert batch_optimum_line([{"value": 1.0}]) is None
