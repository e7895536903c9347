"""Inner solvers for strongly convex smooth lower levels (bilevel/minimize, docs/inner-solvers.md):
L-BFGS and Newton-CG reach the closed-form lower solutions and hypergradients of the conformance
problems to 1e-10 in float64; the residual stop stops at the first iterate with ||grad|| <= tol,
frozen steps leave it unchanged, and eager and static-shape loops agree bit for bit; the static-shape
solvers replayed from a captured graph (the fast path) give the same closed forms; the
planner's choice for ``solver: {name: auto}`` and its refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bilevel import run
from bilevel.cli import app
from bilevel.compile import compile_spec
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig, build_engine
from bilevel.engines.inner import inner_solve
from bilevel.minimize import lbfgs, newton_cg
from bilevel.linalg.hvp import Linearization
from bilevel.optim import InnerOptimizer
from bilevel.planner import make_plan
from bilevel.spec import SpecError, spec_from_data
from helpers import hypergrad_calls, replayed
from oracles import quadratic_data, quadratic_hypergrad, rel_error, ridge_data, ridge_hypergrad, ridge_val_data
from problems.toy import quadratic_spec, ridge_solution, ridge_spec

SOLVERS = [{"name": "lbfgs", "steps": 60, "tol": 1e-12}, {"name": "newton_cg", "steps": 30, "tol": 1e-12},
           {"name": "lbfgs", "steps": 60, "tol": 1e-12, "check_every": 0},
           {"name": "newton_cg", "steps": 30, "check_every": 0, "tol": 1e-12}]
DIRECT = ImplicitConfig(linear_solver=LinearSolverSpec(method="direct"))


def _solver_data(spec: Any, solver: dict[str, Any], engine: Any = None) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    data["levels"]["lower"]["solver"] = solver
    if engine is not None:
        data["engine"] = engine
    return data


def _with_solver(spec: Any, solver: dict[str, Any], engine: Any = None) -> Any:
    return spec_from_data(_solver_data(spec, solver, engine))


def _hypergrad(problem: Any, config: Any = DIRECT) -> Any:
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    return x, engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


# --- closed forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: f"{s['name']}-{s.get('check_every', 10)}")
def test_quadratic_lower_solution_and_hypergradient_to_1e_10(solver: dict[str, Any]) -> None:
    problem = compile_spec(_with_solver(quadratic_spec(), solver))
    x, result = _hypergrad(problem)
    data = quadratic_data()
    y_star = torch.linalg.solve(data["A"], data["B"] @ x[0])
    assert rel_error(result.state.lower[0], y_star) < 1e-10
    assert rel_error(result.grad[0], quadratic_hypergrad(x[0], data)) < 1e-10
    assert float(result.stats.inner_residual) <= 1e-12
    assert result.stats.extra["inner_converged"] == 1
    assert 0 < int(result.stats.inner_steps) < solver["steps"]


@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("solver", SOLVERS[:2], ids=lambda s: s["name"])
def test_ridge_lower_solution_and_hypergradient_to_1e_10(solver: dict[str, Any], per_feature: bool) -> None:
    problem = compile_spec(_with_solver(ridge_spec(per_feature=per_feature), solver))
    x, result = _hypergrad(problem)
    assert rel_error(result.state.lower[0], ridge_solution(x[0], ridge_data())) < 1e-10
    assert rel_error(result.grad[0], ridge_hypergrad(x[0], ridge_data(), ridge_val_data())) < 1e-10


def test_a_run_with_lbfgs_reaches_the_same_upper_solution_as_gradient_descent(tmp_path: Path) -> None:
    results = []
    for i, solver in enumerate([{"name": "sgd", "lr": 0.09, "steps": 400, "warm_start": True},
                                {"name": "lbfgs", "steps": 50, "tol": 1e-11}]):
        spec = _with_solver(quadratic_spec(steps=100, checkpoint_every=None), solver, {"kind": "implicit"})
        results.append(run(spec, out=tmp_path / str(i), progress=False))
    assert rel_error(results[1].x[0], results[0].x[0]) < 1e-8
    rows = [json.loads(line) for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["inner_converged"] == 1 for row in rows if "inner_converged" in row)
    assert any("inner_converged" in row for row in rows)


# --- the residual stop ------------------------------------------------------------------------------
def _quadratic_kernels(n: int = 8) -> tuple[Any, Any, Any, tuple[torch.Tensor]]:
    data = quadratic_data(n=n)
    A, b = data["A"], data["B"] @ torch.ones(data["B"].shape[1], dtype=torch.float64)

    def value(y: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return 0.5 * y[0] @ (A @ y[0]) - y[0] @ b

    def value_and_grad(y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        return value(y), (A @ y[0] - b,)

    def linearize(y: tuple[torch.Tensor, ...]) -> Linearization:
        return Linearization(lambda _, yy: value(yy), (torch.zeros(()),), y)

    return value_and_grad, value, linearize, (torch.zeros(n, dtype=torch.float64),)


def _minimize(kind: str, steps: int, **options: Any) -> Any:
    value_and_grad, value, linearize, y0 = _quadratic_kernels()
    with torch.enable_grad():
        if kind == "lbfgs":
            return lbfgs(value_and_grad, y0, steps, lr=0.09, history=3, **options)
        return newton_cg(value_and_grad, value, linearize, y0, steps, cg_maxiter=2, **options)


@pytest.mark.parametrize("kind", ["lbfgs", "newton_cg"])
def test_the_residual_stop_stops_at_the_first_iterate_below_tol(kind: str) -> None:
    tol, longest = 1e-6, 40
    residuals = [float(_minimize(kind, k).residual) for k in range(longest)]  # ||grad|| at iterate k, no stop
    first = next(k for k, r in enumerate(residuals) if r <= tol)
    assert first > 2  # a problem where the stop has something to stop
    reference = _minimize(kind, first).solution[0]
    for check_every in (0, 1, 4, 7):
        out = _minimize(kind, longest, tol=tol, check_every=check_every)
        assert int(out.steps) == first and bool(out.converged)
        assert torch.equal(out.solution[0], reference)  # frozen steps left the iterate where the test held
    assert not bool(_minimize(kind, first - 1, tol=tol).converged)


def test_newton_cg_solves_its_last_systems_only_as_exactly_as_the_stop_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With tol, the forcing term is min(0.5, max(sqrt(||g||), 0.5 tol / ||g||)) (Kelley 1995,
    eq. 6.20): near the stop CG may end early, and the solve still ends at ||g|| <= tol."""
    import math
    import sys

    from bilevel.linalg.tree import tree_norm

    module = sys.modules["bilevel.minimize.newton_cg"]
    real, seen = module.cg, []

    def recording(matvec: Any, b: Any, x0: Any, maxiter: int, tol: Any, **options: Any) -> Any:
        seen.append((float(tree_norm(b)), float(tol)))
        return real(matvec, b, x0, maxiter, tol, **options)

    monkeypatch.setattr(module, "cg", recording)
    tol = 1e-6
    out = _minimize("newton_cg", 60, tol=tol, check_every=1)
    assert bool(out.converged) and float(out.residual) <= tol
    for norm, forcing in seen:
        assert forcing == pytest.approx(min(0.5, max(math.sqrt(norm), 0.5 * tol / norm)), rel=1e-12)
    assert any(0.5 * tol / norm > math.sqrt(norm) for norm, _ in seen)  # the safeguard set the last ones


def test_an_eager_newton_cg_evaluates_g_once_per_accepted_step_and_hands_its_linearization_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An accepted first trial point's linearization is the next iteration's (no second evaluation
    of G there), and the implicit engine's linear system reuses the one at the solution: one
    hypergradient builds no Linearization of its own, and still gives the closed form."""
    out = _minimize("newton_cg", 60, tol=1e-8, check_every=1)
    assert bool(out.converged) and out.linearization is not None
    assert torch.equal(out.linearization.y[0], out.solution[0])
    assert out.evaluations == int(out.steps) + 1  # one per iteration taken, and the one at the solution
    assert _minimize("newton_cg", 60, tol=1e-8, check_every=0).linearization is None  # static shape: none

    import sys

    module = sys.modules["bilevel.engines.implicit"]
    built = []

    class Counting(Linearization):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, "Linearization", Counting)
    problem = compile_spec(_with_solver(quadratic_spec(), {"name": "newton_cg", "steps": 30, "tol": 1e-12, "check_every": 1}))
    x, result = _hypergrad(problem, ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=50, tol=1e-14)))
    assert not built
    assert rel_error(result.grad[0], quadratic_hypergrad(x[0], quadratic_data())) < 1e-10


def test_first_order_residual_stop_counts_and_freezes() -> None:
    tol = 1e-6
    problem = compile_spec(quadratic_spec(inner_steps=1))
    x = problem.fresh(problem.upper.init)
    y = problem.fresh(problem.lower.init)
    plain = InnerOptimizer(problem.lower.solver)
    iterates, k = [y], 0
    while True:  # the plain GD trajectory until its gradient norm is <= tol
        solved = inner_solve(problem, plain, x, iterates[-1], (), 1)
        if float(solved.grad[0].norm()) <= tol:
            break
        iterates.append(solved.solution)
        k += 1
    for check_every in (0, 1, 10):
        spec = problem.lower.solver.model_copy(update={"tol": tol, "check_every": check_every})
        out = inner_solve(problem, InnerOptimizer(spec), x, y, (), k + 25)
        assert int(out.steps) == k
        assert torch.equal(out.solution[0], iterates[k][0])


def test_without_tol_the_first_order_loop_is_unchanged() -> None:
    problem = compile_spec(quadratic_spec(inner_steps=30))
    x = problem.fresh(problem.upper.init)
    y = problem.fresh(problem.lower.init)
    out = inner_solve(problem, InnerOptimizer(problem.lower.solver), x, y, (), 30)
    assert out.steps == 30


# --- the secant predictor (solver.extrapolate) ----------------------------------------------------------
def test_the_secant_predictor_starts_on_the_path_and_changes_no_result() -> None:
    """y*(x) = A^{-1} B x of the quadratic is linear, so along a line of upper variables the
    prediction 2 y_t - y_{t-1} is the next solution (up to the previous solves' errors, which it
    doubles): the third and fourth solves take no step. With or without it, every hypergradient and
    solution is the closed form."""
    data = quadratic_data()
    taken = {}
    for extrapolate in (False, True):
        solver = {"name": "newton_cg", "steps": 30, "tol": 1e-10, "check_every": 1, "extrapolate": extrapolate}
        problem = compile_spec(_with_solver(quadratic_spec(), solver))
        engine = build_engine(DIRECT)
        x = problem.fresh(problem.upper.init)
        state = engine.init(problem, x)
        taken[extrapolate] = []
        for t in range(5):
            xt = (x[0] + 0.1 * t,)
            result = engine.hypergrad(problem, xt, state, problem.upper.batch())
            state = result.state
            assert rel_error(result.grad[0], quadratic_hypergrad(xt[0], data)) < 1e-10
            assert rel_error(state.lower[0], torch.linalg.solve(data["A"], data["B"] @ xt[0])) < 1e-10
            taken[extrapolate].append(int(result.stats.inner_steps))
        restored = type(state).from_state_dict(state.state_dict())  # the predictor's point is checkpointed
        assert (restored.previous is None) == (not extrapolate)
    assert taken[True][2:4] == [0, 0] and min(taken[False][1:]) > 0 and sum(taken[True]) < sum(taken[False])
    assert taken[True][:2] == taken[False][:2]  # no prediction from the initial values, nor from one solution


@pytest.mark.parametrize("solver, engine, why", [
    ({"name": "sgd", "lr": 0.09, "extrapolate": True}, None, "residual stop"),
    ({"name": "newton_cg", "tol": 1e-8, "extrapolate": True, "warm_start": False}, None, "warm_start"),
    ({"name": "sgd", "lr": 0.09, "tol": 1e-6, "extrapolate": True}, UnrolledConfig(), "implicit")])
def test_a_predicted_start_is_refused_where_it_would_change_the_result(solver: dict, engine: Any, why: str) -> None:
    with pytest.raises(SpecError) as err:
        make_plan(compile_spec(_with_solver(quadratic_spec(), solver)), engine)
    assert "levels.lower.solver.extrapolate" in str(err.value) and why in str(err.value)


def test_auto_predicts_each_start_unless_told_otherwise() -> None:
    plan = make_plan(compile_spec(_with_solver(quadratic_spec(), {"name": "auto", "steps": 50})))
    assert plan.inner_solver.extrapolate and any("secant prediction" in r for r in plan.reasons)
    plan = make_plan(compile_spec(_with_solver(quadratic_spec(), {"name": "auto", "steps": 50, "extrapolate": False})))
    assert not plan.inner_solver.extrapolate and not any("secant prediction" in r for r in plan.reasons)
    sgd = make_plan(compile_spec(_with_solver(quadratic_spec(), {"name": "auto", "steps": 50})), UnrolledConfig())
    assert sgd.inner_solver.name == "sgd" and not sgd.inner_solver.extrapolate


# --- the planner ------------------------------------------------------------------------------------
def _plan(spec: Any) -> Any:
    return make_plan(compile_spec(spec))


def test_auto_is_newton_cg_for_a_small_lower_level_and_lbfgs_for_a_larger_one() -> None:
    small = _plan(_with_solver(quadratic_spec(), {"name": "auto"}))
    assert small.inner_solver.name == "newton_cg" and small.inner_solver.tol == 1e-9
    assert any("Newton-CG" in r for r in small.reasons)
    large = _plan(_with_solver(quadratic_spec(n=1200), {"name": "auto", "tol": 1e-7}))
    assert large.inner_solver.name == "lbfgs" and large.inner_solver.tol == 1e-7
    assert any("L-BFGS" in r and "1200" in r for r in large.reasons)


def test_auto_keeps_gradient_descent_without_the_assumptions_or_for_an_unrolling_engine() -> None:
    data = _solver_data(quadratic_spec(), {"name": "auto", "lr": 0.05})
    data["levels"]["lower"]["assumptions"]["smoothness"] = "unknown"
    plan = _plan(spec_from_data(data))
    assert plan.engine.kind == "implicit" and plan.inner_solver.name == "sgd" and plan.inner_solver.lr == 0.05
    assert any("smoothness = unknown" in r for r in plan.reasons)
    unrolled = make_plan(compile_spec(_with_solver(quadratic_spec(), {"name": "auto"})), UnrolledConfig())
    assert unrolled.inner_solver.name == "sgd"
    assert any("goes through the optimizer's steps" in r for r in unrolled.reasons)


def test_an_explicit_solver_always_wins() -> None:
    plan = _plan(_with_solver(quadratic_spec(n=1200), {"name": "newton_cg"}))
    assert plan.inner_solver is None
    problem = plan.applied(compile_spec(_with_solver(quadratic_spec(n=1200), {"name": "newton_cg"})))
    assert problem.lower.solver.name == "newton_cg"


def test_a_run_with_auto_uses_the_chosen_solver(tmp_path: Path) -> None:
    spec = _with_solver(quadratic_spec(steps=3, checkpoint_every=None), {"name": "auto", "steps": 50})
    run(spec, out=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [row["inner_steps"] for row in rows if "inner_steps" in row]
    assert steps and all(0 < s < 50 for s in steps)  # stopped on the residual, not 50 fixed steps


# --- reuse of the hypergradient ------------------------------------------------------------------------
def test_the_hypergradient_is_reused_only_while_the_inner_residual_stays_below_the_threshold() -> None:
    problem = compile_spec(_with_solver(quadratic_spec(), {"name": "lbfgs", "steps": 60, "tol": 1e-12}))
    x = problem.fresh(problem.upper.init)
    for threshold, reused in ((1e3, 1.0), (1e-14, 0.0)):
        engine = build_engine(DIRECT.model_copy(update={"reuse_hypergradient_below": threshold}))
        first = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
        moved = (x[0] + 1e-3,)
        second = engine.hypergrad(problem, moved, first.state, problem.upper.batch())
        assert first.stats.extra["hypergradient_reused"] == 0.0
        assert second.stats.extra["hypergradient_reused"] == reused
        assert torch.equal(second.grad[0], first.grad[0]) == bool(reused)


# --- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, field", [({"name": "lbfgs"}, "levels.lower.solver.name"),
                                           ({"name": "sgd", "lr": 0.09, "tol": 1e-6}, "levels.lower.solver.tol")])
def test_engines_that_go_through_the_steps_are_refused_second_order_solvers_and_tol(solver: dict, field: str) -> None:
    with pytest.raises(SpecError) as err:
        make_plan(compile_spec(_with_solver(quadratic_spec(), solver)), UnrolledConfig())
    assert field in str(err.value)


def test_the_cli_refuses_lbfgs_with_the_unrolled_engine_at_its_path(tmp_path: Path) -> None:
    data = _solver_data(quadratic_spec(), {"name": "lbfgs"}, {"kind": "unrolled"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "levels.lower.solver.name" in result.output and "unrolled" in result.output
    assert "Traceback" not in result.output


def test_the_outer_optimizer_cannot_be_a_minimizer() -> None:
    data = quadratic_spec().model_dump(mode="json")
    data["levels"]["upper"]["solver"] = {"name": "lbfgs"}
    with pytest.raises(SpecError) as err:
        spec_from_data(data)
    assert "levels.upper.solver" in str(err.value)


def test_second_order_solvers_are_refused_on_minibatched_lower_data() -> None:
    data = _solver_data(ridge_spec(), {"name": "newton_cg"})
    data["levels"]["lower"]["data"]["batch_size"] = 10
    with pytest.raises(SpecError) as err:
        make_plan(compile_spec(spec_from_data(data)))
    assert "levels.lower.solver.name" in str(err.value) and "minibatches" in str(err.value)


# --- the fast path (the conformance suite's replay and compiled modes) ----------------------------
STATIC = [s for s in SOLVERS if s.get("check_every") == 0] + [{"name": "sgd", "lr": 0.09, "steps": 2000, "tol": 1e-12, "check_every": 0},
                                                           {"name": "newton_cg", "steps": 30, "check_every": 0, "tol": 1e-12,
                                                            "extrapolate": True}]


@pytest.mark.parametrize("solver", STATIC, ids=lambda s: s["name"] + ("-extrapolate" if s.get("extrapolate") else ""))
def test_static_shape_solvers_match_the_closed_form_replayed_from_a_captured_graph(solver: dict[str, Any]) -> None:
    """check_every: 0 keeps the solve free of host reads: the whole hypergradient is captured and
    every call replays it, and the replayed result is the closed form to 1e-10 (with a predicted
    start too, whose state gains the previous solution from the third call on)."""
    problem = compile_spec(_with_solver(quadratic_spec(), solver))
    config = DIRECT.model_copy(update={"fast_path": "cuda_graph"})
    with replayed():
        engine = build_engine(config)
        results = hypergrad_calls(engine, problem, 5 if solver.get("extrapolate") else 3)
    if solver.get("extrapolate"):
        assert results[0].state.previous is None and results[-1].state.previous is not None
    report = engine.execution_report()
    assert report["hypergradient"] == "cuda_graph", report
    x = problem.fresh(problem.upper.init)
    data = quadratic_data()
    for result in results:
        assert rel_error(result.grad[0], quadratic_hypergrad(x[0], data)) < 1e-10
        assert float(result.stats.inner_residual) <= 1e-12
    # the first call solves from the start; the next ones are warm-started at the solution
    assert 0 < int(results[0].stats.inner_steps) < solver["steps"]
    y_star = torch.linalg.solve(data["A"], data["B"] @ x[0])
    assert rel_error(results[-1].state.lower[0], y_star) < 1e-10


def test_a_residual_stop_read_on_the_host_keeps_the_fast_path_eager_and_says_why() -> None:
    problem = compile_spec(_with_solver(quadratic_spec(), SOLVERS[0]))
    with replayed():
        engine = build_engine(DIRECT.model_copy(update={"fast_path": "cuda_graph"}))
        results = hypergrad_calls(engine, problem, 2)
    report = engine.execution_report()
    assert report.get("hypergradient") != "cuda_graph"
    assert any("check_every: 0" in reason for reason in report["reasons"]), report
    x = problem.fresh(problem.upper.init)
    assert rel_error(results[-1].grad[0], quadratic_hypergrad(x[0], quadratic_data())) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS[:2] + STATIC[-1:], ids=lambda s: s["name"])
def test_the_compile_mode_gives_the_closed_form_with_the_new_solvers(solver: dict[str, Any]) -> None:
    """fast_path: compile compiles first-order steps only: L-BFGS, Newton-CG and a residual stop
    run their own (eager) loop, and the hypergradient is still the closed form to 1e-10."""
    problem = compile_spec(_with_solver(quadratic_spec(), solver))
    engine = build_engine(DIRECT.model_copy(update={"fast_path": "compile"}))
    results = hypergrad_calls(engine, problem, 3)
    x = problem.fresh(problem.upper.init)
    for result in results:
        assert rel_error(result.grad[0], quadratic_hypergrad(x[0], quadratic_data())) < 1e-10
    assert engine.execution_report().get("inner_loop") != "compiled"
