"""Lower levels with sets and proximal terms (float64): the implicit engine differentiates the
fixed point y = P(y - eta grad_y G) (active-set aware), the unrolled engine the projected /
proximal steps; both against the closed form of the lasso on its active set, finite
differences for the group lasso, and the fixed-point residual at converged solutions. Then the
spec errors of proximal terms and the planner's choices."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel.compile import compile_spec
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig, build_engine
from bilevel.engines.inner import inner_residual
from bilevel.linalg.tree import tree_norm
from bilevel.planner import make_plan
from bilevel.spec import SpecError, spec_from_data
from oracles import lasso_closed_form
from problems.sparse_hpo import sparse_hpo_spec

CASES = str((Path(__file__).parent / "runtime_data" / "sparse_cases.py").resolve())
IMPLICIT = [ImplicitConfig(), ImplicitConfig(linear_solver=LinearSolverSpec(method="direct")),
            ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=300))]


def _call(problem, config, x=None):
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init) if x is None else x
    return engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return float((got - want).norm()) <= tol * max(float(want.norm()), 1e-300)


# --- the lasso as w = u - v with u, v >= 0: box sets, no prox ------------------------------------------
@pytest.mark.parametrize("config", [*IMPLICIT, UnrolledConfig()], ids=lambda c: f"{c.kind}-{getattr(c, 'linear_solver', None) and c.linear_solver.method}")
def test_split_lasso_on_box_sets_matches_the_closed_form(config: Any) -> None:
    """The case the implicit engine used to get silently wrong: both halves sit on their bound 0
    wherever w* is 0 (and one of them wherever it is not), so grad_y G = 0 does not hold there."""
    problem = compile_spec(sparse_hpo_spec(form="split", inner_steps=1500, inner_lr=0.25))
    exact = lasso_closed_form(0.1)
    result = _call(problem, config)
    u, v = result.state.lower
    assert float((u * v).abs().max()) == 0.0  # never both positive
    assert torch.equal((u - v) != 0, exact.active) and 0 < int(exact.active.sum()) < u.numel()
    assert float((u - v - exact.w).abs().max()) < 1e-10
    assert abs(float(result.grad[0]) - float(exact.d_l1)) < 1e-8 * abs(float(exact.d_l1))
    assert float(result.stats.inner_residual) < 1e-8  # the projected-gradient residual


def test_the_residual_on_sets_is_the_fixed_point_residual_not_the_gradient_norm() -> None:
    problem = compile_spec(sparse_hpo_spec(form="split", inner_steps=1500, inner_lr=0.25))
    x = problem.fresh(problem.upper.init)
    y = _call(problem, ImplicitConfig()).state.lower
    batch = problem.lower.batch()
    assert float(inner_residual(problem, x, y, batch)) < 1e-8
    leaves = tuple(p.detach().requires_grad_(True) for p in y)
    grads = torch.autograd.grad(problem.lower_objective(x, leaves, batch), leaves)
    assert float(tree_norm(grads)) > 0.1  # what was reported before: the plain gradient at the bounds


# --- prox: the lasso on a log scale, the group lasso, a user's prox ---------------------------------------
def test_log_scale_strength_gets_the_chain_rule() -> None:
    """A hyperparameter variable with log: true: the engines' variable is log l1, so dF/dlog l1 = l1 dF/dl1."""
    problem = compile_spec(sparse_hpo_spec(log_scale=True))
    exact = lasso_closed_form(0.1)
    for config in (ImplicitConfig(), UnrolledConfig()):
        got = float(_call(problem, config).grad[0])
        assert abs(got - 0.1 * float(exact.d_l1)) < 1e-8 * abs(0.1 * float(exact.d_l1)), config


def _spec(lower_vars: dict[str, Any], lower: str, upper: str, upper_vars: dict[str, Any] | None = None,
          solver: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    data = {
        "levels": {
            "upper": {"variables": upper_vars or {"l1": {"shape": [], "init": 0.1}}, "objective": upper,
                      "data": {"source": f"{CASES}:train", "kwargs": {"split": "val"}}},
            "lower": {"parent": "upper", "variables": lower_vars, "objective": lower,
                      "data": {"source": f"{CASES}:train"},
                      "solver": solver or {"name": "sgd", "lr": 0.5, "steps": 600, "warm_start": False},
                      "assumptions": {"convexity": "strongly_convex"}},
        },
        "run": {"dtype": "float64", "device": "cpu", "seed": 0},
    }
    data.update(extra)
    return data


def _group_problem():
    return compile_spec(spec_from_data(_spec({"w": {"shape": [5, 4], "prox": {"kind": "group_lasso", "strength": "l1", "axis": 1}}},
                                             f"{CASES}:group_lower", f"{CASES}:group_upper")))


def test_group_lasso_matches_finite_differences() -> None:
    problem = _group_problem()
    x = problem.fresh(problem.upper.init)
    implicit, unrolled = (_call(problem, c, x) for c in (ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=40)), UnrolledConfig()))
    norms = implicit.state.lower[0].norm(dim=1)
    assert int((norms == 0).sum()) >= 1 and int((norms > 0).sum()) >= 1  # whole groups at zero, others free

    def upper_at(l1: float) -> float:
        xx = (torch.tensor(l1, dtype=torch.float64),)
        engine = build_engine(ImplicitConfig())
        y = engine.lower_solution(problem, xx, engine.init(problem, xx))
        return float(problem.upper_objective(xx, y, problem.upper.batch()))

    h = 1e-6
    fd = (upper_at(0.1 + h) - upper_at(0.1 - h)) / (2 * h)
    for result in (implicit, unrolled):
        assert abs(float(result.grad[0]) - fd) < 1e-6 * abs(fd)
        assert float(result.stats.inner_residual) < 1e-8
    assert abs(float(implicit.grad[0]) - float(unrolled.grad[0])) < 1e-10 * abs(fd)


def test_a_users_prox_gives_the_builtin_result() -> None:
    builtin = compile_spec(sparse_hpo_spec())
    data = sparse_hpo_spec().model_dump(mode="json")
    data["levels"]["lower"]["variables"]["w"]["prox"] = {"kind": "custom", "fn": f"{CASES}:my_soft_threshold"}
    custom = compile_spec(spec_from_data(data))
    for config in (ImplicitConfig(), UnrolledConfig()):
        a, b = _call(builtin, config), _call(custom, config)
        assert _close(b.grad[0], a.grad[0], 1e-13) and torch.equal(a.state.lower[0] != 0, b.state.lower[0] != 0)


def test_nonnegative_lasso_by_a_box_and_by_a_users_prox_matches_its_closed_form() -> None:
    """l1 prox + the box [0, inf) (the projection of the soft threshold) and a custom one-sided
    threshold are the same operator; the closed form on the active set A (all w*_A > 0):
    w*_A = H_AA^{-1} (X_A^T t / n - l1), dF/dl1 = -grad_A F . H_AA^{-1} 1."""
    data = sparse_hpo_spec().model_dump(mode="json")
    data["levels"]["lower"]["variables"]["w"]["set"] = {"low": 0.0}
    boxed = compile_spec(spec_from_data(data))
    data["levels"]["lower"]["variables"]["w"].pop("set")
    data["levels"]["lower"]["variables"]["w"]["prox"] = {"kind": "custom", "fn": f"{CASES}:nonnegative_l1", "kwargs": {"scale": 1.0}}
    custom = compile_spec(spec_from_data(data))
    train, val = boxed.lower.data.full, boxed.upper.data.full
    X, t, Xv, tv = train["X"], train["t"], val["X"], val["t"]
    results = [_call(p, c) for p in (boxed, custom) for c in (ImplicitConfig(), UnrolledConfig())]
    w = results[0].state.lower[0]
    active = w > 0
    H = X.T @ X / X.shape[0]
    grad_g = H @ w - X.T @ t / X.shape[0]
    assert 0 < int(active.sum()) < w.numel() and bool((grad_g[~active] + 0.1 > 1e-4).all())  # strict complementarity
    w_a = torch.linalg.solve(H[active][:, active], (X.T @ t / X.shape[0])[active] - 0.1)
    assert float((w[active] - w_a).abs().max()) < 1e-10
    grad_f = 2 * Xv.T @ (Xv @ w - tv) / Xv.shape[0]
    exact = -grad_f[active] @ torch.linalg.solve(H[active][:, active], torch.ones(int(active.sum()), dtype=w.dtype))
    for result in results:
        assert abs(float(result.grad[0]) - float(exact)) < 1e-8 * abs(float(exact))


# --- errors ---------------------------------------------------------------------------------------
def _issues(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        compile_spec(spec_from_data(data))
    return [(issue.path, issue.message) for issue in info.value.issues]


LASSO = {"w": {"shape": [20], "prox": {"kind": "l1", "strength": "l1"}}}
SMOOTH, UPPER = "problems.sparse_hpo:smooth_lower", "problems.sparse_hpo:validation_upper"

BAD = {
    "adam inner solver": (_spec(LASSO, SMOOTH, UPPER, solver={"name": "adam", "lr": 0.1, "steps": 10}),
                          "levels.lower.solver.name", "need name: sgd"),
    "unknown strength": (_spec({"w": {"shape": [20], "prox": {"kind": "l1", "strength": "lam"}}}, SMOOTH, UPPER),
                         "levels.lower.variables.w.prox.strength", "'lam' is not a tensor variable of the upper level"),
    "strength of the wrong shape": (_spec(LASSO, SMOOTH, UPPER, upper_vars={"l1": {"shape": [3], "init": 0.1}}),
                                    "levels.lower.variables.w.prox.strength", "does not broadcast against [20]"),
    "group lasso in a box": (_spec({"w": {"shape": [5, 4], "set": {"low": 0.0}, "prox": {"kind": "group_lasso", "strength": 0.1}}},
                                   f"{CASES}:group_lower", f"{CASES}:group_upper"),
                             "levels.lower.variables.w.prox", "only for an elementwise prox"),
    "group axis": (_spec({"w": {"shape": [5, 4], "prox": {"kind": "group_lasso", "strength": 0.1, "axis": 2}}},
                         f"{CASES}:group_lower", f"{CASES}:group_upper"),
                   "levels.lower.variables.w.prox.axis", "not an axis"),
    "prox upstairs": (_spec(LASSO, SMOOTH, UPPER, upper_vars={"l1": {"shape": [], "init": 0.1, "prox": {"kind": "l1", "strength": 0.1}}}),
                      "levels.upper.variables.l1.prox", "lower level"),
    "custom prox with the wrong signature": (_spec({"w": {"shape": [20], "prox": {"kind": "custom", "fn": f"{CASES}:train"}}}, SMOOTH, UPPER),
                                             "levels.lower.variables.w.prox.fn", "prox(upper, value, step)"),
    "negative strength": (_spec({"w": {"shape": [20], "prox": {"kind": "l1", "strength": -1.0}}}, SMOOTH, UPPER),
                          "levels.lower.variables.w.prox", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_prox_specs_are_errors_at_their_paths(case: str) -> None:
    data, path, message = BAD[case]
    issues = _issues(data)
    assert any(p.startswith(path) and message in m for p, m in issues), issues


def test_prox_with_instances_is_refused() -> None:
    data = _spec(LASSO, SMOOTH, UPPER, instances={"count": 2, "vary": {"levels.upper.variables.l1.init": [0.1, 0.2]}})
    assert _issues(data)[0][0] == "levels.lower.variables.w.prox"


def test_bilevel_validate_reports_a_bad_prox_without_a_traceback(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BAD["adam inner solver"][0]))
    out = subprocess.run([sys.executable, "-m", "bilevel.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "levels.lower.solver.name" in text and "spec.yaml" in text and "Traceback" not in text


# --- the planner --------------------------------------------------------------------------------------
def test_planner_differentiates_the_fixed_point_or_unrolls() -> None:
    plan = make_plan(compile_spec(sparse_hpo_spec()))
    assert plan.engine.kind == "implicit" and plan.engine.linear_solver.method == "direct"
    assert any("levels.lower.variables.w.prox" in r and "fixed point" in r for r in plan.reasons)
    split = make_plan(compile_spec(sparse_hpo_spec(form="split")))
    assert any("levels.lower.variables.u.set" in r for r in split.reasons)
    assert make_plan(compile_spec(sparse_hpo_spec(convexity="convex"))).engine.kind == "unrolled"
    explicit = make_plan(compile_spec(sparse_hpo_spec()), {"kind": "implicit"})
    assert any("fixed point" in r for r in explicit.reasons)
    assert not math.isnan(float(_call(compile_spec(sparse_hpo_spec()), plan.engine).grad[0]))


def test_a_batch_of_instances_on_boxes_gives_each_its_own_fixed_point_hypergradient() -> None:
    from bilevel.compile.instances import instance_specs

    data = sparse_hpo_spec(form="split", inner_steps=800, inner_lr=0.25).model_dump(mode="json")
    data["instances"] = {"count": 2, "vary": {"levels.upper.variables.l1.init": [0.1, 0.3]}}
    loaded = spec_from_data(data)
    batched = _call(compile_spec(loaded), ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=40)))
    for k, one in enumerate(instance_specs(loaded)):
        single = _call(compile_spec(one), ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=40)))
        assert abs(float(batched.grad[0][k]) - float(single.grad[0])) < 1e-10 * abs(float(single.grad[0]))
    assert abs(float(batched.grad[0][0]) - float(lasso_closed_form(0.1).d_l1)) < 1e-8 * abs(float(lasso_closed_form(0.1).d_l1))
