"""More than two levels: the nested implicit and unrolled engines against the closed-form
three-level quadratic and against central finite differences of the composed solution map
(float64); what each objective sees; compile-time and planner errors; the runtime (run, resume,
result.json, metrics) and the CLI on a three-level spec; the realistic preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import bilevel
from bilevel.compile import compile_spec
from bilevel.linalg.hvp import Linearization, grad_and_value
from bilevel.engines import build_engine
from bilevel.engines.nested_implicit import nested_hypergrad
from bilevel.engines.nested_unrolled import nested_unrolled_hypergrad
from bilevel.problem import Problem
from bilevel.planner import make_plan
from bilevel.presets import find_preset
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.spec import SpecError, load_spec, spec_from_data
from problems.toy import quadratic_data, quadratic_hypergrad, quadratic_spec
from problems.toy.three_level import three_level_closed_form, three_level_spec

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "runtime_data"))
from nonquadratic_chain import chain_spec  # noqa: E402

IMPLICIT = ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=4))
ENGINES = {
    "implicit-cg": IMPLICIT,
    "implicit-neumann": ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=60)),
    "unrolled": UnrolledConfig(),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _hypergrad(problem: Problem, config: Any, x: tuple[torch.Tensor, ...] | None = None) -> Any:
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init) if x is None else x
    batch = problem.upper.data.full if problem.upper.data is not None else None
    return engine.hypergrad(problem, x, engine.init(problem, x), batch)


def _composed_fd(problem: Problem, eps: float = 1e-5) -> torch.Tensor:
    """Central differences of a -> F(a, z*_1(a), ..., z*_{K-1}(a)), the lower levels solved by
    the nested inner loops from their initial values."""
    engine = build_engine(IMPLICIT)
    x = problem.fresh(problem.upper.init)
    batch = problem.upper.data.full if problem.upper.data is not None else None

    def composed(a: torch.Tensor) -> float:
        y = engine.lower_solution(problem, (a,), engine.init(problem, (a,)))
        return float(problem.upper_objective((a,), y, batch))

    basis = torch.eye(x[0].numel(), dtype=torch.float64)
    return torch.tensor([(composed(x[0] + eps * e) - composed(x[0] - eps * e)) / (2 * eps) for e in basis], dtype=torch.float64)


# --- the closed-form oracle -------------------------------------------------------------------
@pytest.mark.parametrize("name", ENGINES)
def test_three_level_hypergradient_matches_the_closed_form(name: str) -> None:
    problem = compile_spec(three_level_spec())  # 40 cold-started steps per lower level: converged
    x = problem.fresh(problem.upper.init)
    out = _hypergrad(problem, ENGINES[name], x)
    exact = three_level_closed_form(x[0])
    assert _rel(out.grad[0], exact["hypergrad"]) < 1e-6
    b, c = problem.split(out.state.lower)
    assert _rel(b[0], exact["b"]) < 1e-9 and _rel(c[0], exact["c"]) < 1e-9
    assert float(out.stats.inner_residual) < 1e-9
    assert set(out.stats.extra) == {"inner_residual.middle", "inner_residual.bottom"}


def test_closed_form_matches_finite_differences_of_the_composed_solution_map() -> None:
    """The toy's formulas (docstring, README) against the inner loops' own solution map."""
    problem = compile_spec(three_level_spec())
    fd = _composed_fd(problem)
    exact = three_level_closed_form(problem.upper.init[0])["hypergrad"]
    assert _rel(fd, exact) < 1e-8


def test_nonquadratic_chain_matches_finite_differences() -> None:
    """Non-quadratic couplings make the third derivatives that the nested implicit engine
    differentiates through non-zero; unrolling gets there by an independent route."""
    problem = compile_spec(chain_spec(depth=3, steps=20))
    fd = _composed_fd(problem)
    implicit = _hypergrad(problem, ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=3))).grad[0]
    unrolled = _hypergrad(problem, UnrolledConfig()).grad[0]
    assert _rel(implicit, fd) < 1e-7
    assert _rel(unrolled, fd) < 1e-7


@pytest.mark.slow
@pytest.mark.parametrize("config", [ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=3)), UnrolledConfig()], ids=["implicit", "unrolled"])
def test_four_level_chain_matches_finite_differences(config: Any) -> None:
    """Four levels: the recursion at depth 3 below the top (third-order products in the implicit
    engine, third derivatives through every bottom step in the unrolled one). 15 steps per level
    leave a residual of ~4e-7 at level 1, which bounds the agreement."""
    problem = compile_spec(chain_spec(depth=4, steps=15))
    assert _rel(_hypergrad(problem, config).grad[0], _composed_fd(problem)) < 1e-6


@pytest.mark.parametrize("config", [ImplicitConfig(), UnrolledConfig()], ids=["implicit", "unrolled"])
def test_a_two_level_chain_gives_the_two_level_hypergradient(config: Any) -> None:
    """The nested algorithms (what the engines run for more than two levels) on a chain of depth 2."""
    two = compile_spec(quadratic_spec(inner_steps=400))
    x = two.fresh(two.upper.init)
    state = build_engine(config).init(two, x)
    batch = two.upper.data.full
    if config.kind == "implicit":
        out = nested_hypergrad(two, config.linear_solver, x, state, batch)
    else:
        out = nested_unrolled_hypergrad(two, x, state, batch)
    assert _rel(out.grad[0], quadratic_hypergrad(x[0], quadratic_data())) < 1e-10


# --- tuned optimizer hyperparameters ----------------------------------------------------------
def _tuned_spec(tuned: dict[str, str]) -> Any:
    data = three_level_spec(middle_steps=6, bottom_steps=6, warm_start=True).model_dump(mode="json")
    data["levels"]["top"]["variables"]["h"] = {"shape": [], "init": 0.3}
    data["levels"]["bottom"]["solver"]["tuned"] = tuned
    return spec_from_data(data)


@pytest.mark.parametrize("tuned", [{"lr": "h"}, {"weight_decay": "h"}], ids=["lr", "weight_decay"])
def test_tuned_hyperparameters_get_the_derivative_of_the_nested_algorithm(tuned: dict[str, str]) -> None:
    """A top variable tunes the bottom solver; unrolling differentiates the 6 x 6-step algorithm
    exactly, so its hypergradient equals central differences of that same algorithm."""
    problem = compile_spec(_tuned_spec(tuned))
    engine = build_engine(UnrolledConfig())
    x = problem.fresh(problem.upper.init)
    batch = problem.upper.data.full
    out = engine.hypergrad(problem, x, engine.init(problem, x), batch)
    index = problem.upper.tensors["h"]

    def algorithm(h: float) -> float:
        xx = tuple(torch.full_like(p, h) if i == index else p for i, p in enumerate(x))
        return float(problem.upper_objective(xx, engine.lower_solution(problem, xx, engine.init(problem, xx)), batch))

    h = float(x[index])
    fd = (algorithm(h + 1e-6) - algorithm(h - 1e-6)) / 2e-6
    assert abs(float(out.grad[index]) - fd) < 1e-6 * max(1.0, abs(fd))
    assert abs(fd) > 1e-3  # the hyperparameter matters


# --- what each objective sees -----------------------------------------------------------------
SEEN: dict[str, tuple[list[str], list[str]]] = {}


def _recorder(level: str) -> Any:
    def objective(upper: Any, lower: Any, batch: Any) -> torch.Tensor:
        SEEN[level] = (sorted(upper), sorted(lower))
        return sum((v**2).sum() for v in (*upper.values(), *lower.values()))

    return objective


record_top, record_middle, record_bottom = _recorder("top"), _recorder("middle"), _recorder("bottom")


def test_objectives_see_the_chain_split_at_their_level() -> None:
    module = Path(__file__).resolve()
    data = three_level_spec().model_dump(mode="json")
    for name in ("top", "middle", "bottom"):
        data["levels"][name]["objective"] = f"{module}:record_{name}"
        data["levels"][name]["objective_kwargs"] = {}
        data["levels"][name]["data"] = None
    problem = compile_spec(spec_from_data(data, base_dir=HERE))  # the dry run calls each objective once
    seen = problem.chain[0].objective.__globals__["SEEN"]  # the file reference loads its own copy of this module
    assert seen["top"] == (["a"], ["b", "c"])  # the top level: its own variables upstairs, as for two levels
    assert seen["middle"] == (["a"], ["b", "c"])  # levels above / this level and below
    assert seen["bottom"] == (["a", "b"], ["c"])


def test_the_bottom_pair_evaluates_the_bottom_objective_with_its_weight_decay() -> None:
    data = three_level_spec().model_dump(mode="json")
    data["levels"]["top"]["variables"]["wd"] = {"shape": [], "init": 0.7}
    data["levels"]["bottom"]["solver"]["tuned"] = {"weight_decay": "wd"}
    data["levels"]["middle"]["solver"]["weight_decay"] = 0.2
    problem = compile_spec(spec_from_data(data))
    params = [tuple(torch.randn_like(p) for p in level.init) for level in problem.chain]
    batch = problem.chain[2].data.full
    pair = problem.bottom_pair.lower_objective(problem.join(params[:2]), params[2], batch)
    assert torch.allclose(pair, problem.objective(2, params, batch))
    wd = params[0][problem.chain[0].tensors["wd"]]
    plain = problem.chain[2].objective(*problem.views(2, params), batch)
    assert torch.allclose(problem.objective(2, params, batch), plain + 0.5 * wd * (params[2][0] ** 2).sum())
    middle_plain = problem.chain[1].objective(*problem.views(1, params), problem.chain[1].data.full)
    assert torch.allclose(problem.objective(1, params, problem.chain[1].data.full), middle_plain + 0.1 * (params[1][0] ** 2).sum())


def test_a_chain_has_no_single_lower_objective() -> None:
    problem = compile_spec(three_level_spec())
    with pytest.raises(TypeError, match="two-level engines do not apply"):
        problem.lower_objective(problem.upper.init, problem.lower.init, None)
    assert problem.lower.param_names == ("b", "c")  # the runtime's picture: every level below the top


# --- the shared second-order pieces -----------------------------------------------------------
def test_linearization_with_create_graph_gives_differentiable_partial_products() -> None:
    """Products at (x, y) where y depends on x: partial derivatives, differentiable again."""
    x = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    y = x * 2.0  # y depends on x, as a lower solution does

    def g(xx: tuple[torch.Tensor, ...], yy: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return (yy[0] ** 3).sum() * xx[0].sum() + (xx[0] * yy[0]).sum()

    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lin = Linearization(g, (x,), (y,), create_graph=True)
    (hv,) = lin.hvp((v,))  # d2g/dy2 v = 6 y sum(x) v (partial: y held fixed)
    assert torch.allclose(hv, 6 * y * x.sum() * v)
    (total,) = torch.autograd.grad(hv.sum(), x, retain_graph=True)  # now differentiable, y's dependence on x included
    expected = torch.autograd.functional.jacobian(lambda t: 6 * (2 * t) * t.sum() * v, x.detach()).sum(0)
    assert torch.allclose(total, expected)
    (jv,) = lin.vjp_x((v,))  # d/dx <grad_y g, v> = 3 y^2 . v + v
    assert torch.allclose(jv, (3 * y**2 * v).sum() + v)


def test_grad_and_value_stop_at_gives_the_partial_derivative() -> None:
    """A warm-started iterate y that an upper variable x was computed from: the inner step needs
    the partial derivative dG/dy at fixed x; differentiating y directly gives the total one."""
    y = torch.tensor([0.5, -0.2], dtype=torch.float64, requires_grad=True)
    x = 3.0 * torch.tanh(y)  # x depends on y, as a middle variable updated from the previous bottom solution

    def g(p: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return (torch.sin(p[0]) * x).sum() + (p[0] ** 4).sum()

    partial = torch.cos(y) * x + 4 * y**3
    total = partial + torch.sin(y) * 3.0 / torch.cosh(y) ** 2
    (plain,), _ = grad_and_value(g, (y,), create_graph=True)
    (lifted,), _ = grad_and_value(g, (y,), create_graph=True, stop_at=(x,))
    assert torch.allclose(plain, total) and torch.allclose(lifted, partial)
    (second,) = torch.autograd.grad(lifted.sum(), y)  # still differentiable in y, through x too
    expected = torch.autograd.functional.jacobian(lambda t: torch.cos(t) * 3 * torch.tanh(t) + 4 * t**3, y.detach()).sum(0)
    assert torch.allclose(second, expected)


def test_warm_started_nested_unrolling_is_the_derivative_of_its_algorithm() -> None:
    """Warm starts within a call make each bottom start an ancestor of the middle variable; the
    bottom steps must still use the partial gradient (stop_at). Without it the engine ran another
    algorithm and was 5.6e-6 off here."""
    problem = compile_spec(three_level_spec(middle_steps=10, bottom_steps=10, warm_start=True))
    engine = build_engine(UnrolledConfig())
    x = problem.fresh(problem.upper.init)
    batch = problem.upper.data.full
    grad = engine.hypergrad(problem, x, engine.init(problem, x), batch).grad[0]

    def algorithm(a: torch.Tensor) -> float:
        return float(problem.upper_objective((a,), engine.lower_solution(problem, (a,), engine.init(problem, (a,))), batch))

    basis = torch.eye(2, dtype=torch.float64)
    fd = torch.tensor([(algorithm(x[0] + 1e-5 * e) - algorithm(x[0] - 1e-5 * e)) / 2e-5 for e in basis], dtype=torch.float64)
    assert _rel(grad, fd) < 1e-8


# --- planner ----------------------------------------------------------------------------------
def _plan(data: dict[str, Any], engine: Any = None) -> Any:
    loaded = spec_from_data(data)
    return make_plan(compile_spec(loaded), engine)


def test_planner_picks_nested_implicit_for_strongly_convex_levels() -> None:
    plan = _plan(three_level_spec().model_dump(mode="json"))
    assert plan.engine.kind == "implicit" and plan.engine.linear_solver.maxiter == 4  # the largest lower level
    assert "chain of 3, top -> middle -> bottom" in plan.reasons[0]
    json.dumps(plan.to_json())


def test_planner_unrolls_when_a_lower_level_is_not_strongly_convex() -> None:
    data = three_level_spec().model_dump(mode="json")
    data["levels"]["middle"]["assumptions"]["convexity"] = "unknown"
    plan = _plan(data)
    assert plan.engine.kind == "unrolled"
    assert "levels.middle.assumptions.convexity = unknown" in plan.reasons[1]
    assert "1680 (40 at middle, 1640 at bottom)" in plan.reasons[2]


def test_planner_unrolls_for_a_tuned_learning_rate_and_warns_over_budget() -> None:
    data = _tuned_spec({"lr": "h"}).spec.model_dump(mode="json")
    data["run"]["budget"] = {"memory_mb": 1e-6}
    plan = _plan(data)
    assert plan.engine.kind == "unrolled" and "levels.bottom.solver.tuned.lr" in plan.reasons[1]
    assert any("over run.budget.memory_mb" in w for w in plan.warnings)
    explicit = _plan(data, ImplicitConfig())
    assert any("hypergradient will be zero" in w for w in explicit.warnings)


def test_explicit_engine_warns_when_convexity_contradicts() -> None:
    data = three_level_spec().model_dump(mode="json")
    data["levels"]["bottom"]["assumptions"]["convexity"] = "nonconvex"
    plan = _plan(data, ImplicitConfig())
    assert plan.engine.kind == "implicit"
    assert any("levels.bottom.assumptions.convexity = nonconvex" in w for w in plan.warnings)


# --- bad input --------------------------------------------------------------------------------
def _mutate(**changes: Any) -> dict[str, Any]:
    data = three_level_spec().model_dump(mode="json")
    for path, value in changes.items():
        node = data
        *head, last = path.split("__")
        for key in head:
            node = node[key]
        node[last] = value
    return data


BAD = {
    "two-level engine": (three_level_spec().model_dump(mode="json"), {"kind": "penalty"}, "engine.kind", "engines for more than two levels: implicit, unrolled"),
    "truncation": (three_level_spec().model_dump(mode="json"), {"kind": "unrolled", "truncate": 5}, "engine.truncate", "not available"),
    "checkpointing": (three_level_spec().model_dump(mode="json"), {"kind": "unrolled", "checkpoint_every": 5}, "engine.checkpoint_every", "not available"),
    "direct solve": (three_level_spec().model_dump(mode="json"), {"kind": "implicit", "linear_solver": {"method": "direct"}}, "engine.linear_solver.method", "use cg or neumann"),
    "forward HVPs": (three_level_spec().model_dump(mode="json"), {"kind": "implicit", "hvp": "forward"}, "engine.hvp", "use reverse"),
    "constraints": (_mutate(levels__middle__constraints=[{"fn": "problems.toy.three_level:middle_objective"}]), None,
                    "levels.middle.constraints", "not supported"),
    "middle without solver": (_mutate(levels__middle__solver=None), None, "levels.middle.solver", "inner solver"),
    "tuned from below": (_mutate(levels__middle__solver={"name": "sgd", "tuned": {"lr": "c"}}), None,
                         "levels.middle.solver.tuned.lr", "not a tensor variable of a level above"),
    "shape mismatch": (_mutate(levels__bottom__variables={"c": {"shape": [7]}}), None, "levels.bottom.objective", "check the shapes"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_multilevel_input_names_the_field(case: str) -> None:
    data, engine, path, message = BAD[case]
    if engine is not None:
        data = {**data, "engine": engine}
    with pytest.raises(SpecError) as info:
        loaded = spec_from_data(data)
        make_plan(compile_spec(loaded))
    assert any(issue.path == path and message in issue.message for issue in info.value.issues), str(info.value)


def test_engines_refuse_options_they_cannot_honour_when_built_directly() -> None:
    problem = compile_spec(three_level_spec())
    engine = build_engine(UnrolledConfig(truncate=3))  # valid for two levels; on three it refuses
    x = problem.fresh(problem.upper.init)
    with pytest.raises(ValueError, match="engine.truncate"):
        engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.data.full)


# --- runtime and CLI --------------------------------------------------------------------------
def test_run_reaches_the_three_level_optimum(tmp_path: Path) -> None:
    result = bilevel.run(load_spec(find_preset("toy/three_level")), out=tmp_path, progress=False)
    a = torch.tensor(result.result["upper_variables"]["a"], dtype=torch.float64)
    a_star = three_level_closed_form(a)["a_star"]
    assert result.result["engine"] == "implicit" and result.result["status"] == "completed"
    assert _rel(a, a_star) < 1e-6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 60 and records[-1]["inner_residual.middle"] < 1e-9
    assert records[-1]["upper_loss"] < records[0]["upper_loss"]


def test_resume_continues_to_the_same_result(tmp_path: Path) -> None:
    spec = find_preset("toy/three_level")
    full = bilevel.run(load_spec(spec, overrides=["run.steps=24", "run.checkpoint_every=8"]), out=tmp_path / "full", progress=False)
    bilevel.run(load_spec(spec, overrides=["run.steps=16", "run.checkpoint_every=8"]), out=tmp_path / "cut", progress=False)
    resumed = bilevel.run(load_spec(spec, overrides=["run.steps=24", "run.checkpoint_every=8"]), out=tmp_path / "cut",
                          resume=True, progress=False)
    assert resumed.result["upper_variables"] == full.result["upper_variables"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.y, full.y))
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 25))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_differentiates_runs_and_refuses_on_a_three_level_spec(tmp_path: Path) -> None:
    spec = tmp_path / "three.yaml"
    spec.write_text(yaml.safe_dump(three_level_spec(steps=3).model_dump(mode="json")))
    hyper = _cli("hypergrad", str(spec), "--json", cwd=tmp_path)
    assert hyper.returncode == 0, hyper.stderr
    payload = json.loads(hyper.stdout)
    assert payload["engine"] == "implicit" and "chain of 3" in payload["plan_reasons"][0]
    a = three_level_spec().levels["top"].variables["a"]
    exact = three_level_closed_form(compile_spec(three_level_spec()).upper.init[0])["hypergrad"]
    assert a.shape == [2] and _rel(torch.tensor(payload["hypergradient"]["a"], dtype=torch.float64), exact) < 1e-6
    run = _cli("run", str(spec), "--engine", "unrolled", "--out", str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["steps"] == 3 and result["engine"] == "unrolled"
    bad = _cli("plan", str(spec), "--engine", "bo_rep", cwd=tmp_path)
    assert bad.returncode == 2 and "engine.kind" in bad.stderr and "Traceback" not in bad.stderr


# --- the realistic preset ---------------------------------------------------------------------
def test_hpo_reweight_preset_runs_and_reports(tmp_path: Path) -> None:
    loaded = load_spec(find_preset("hpo_reweight/digits"), overrides=["run.steps=3", "levels.reweight.solver.steps=2",
                                                                      "levels.model.solver.steps=5"])
    result = bilevel.run(loaded, device="cpu", out=tmp_path, progress=False).result
    assert result["engine"] == "unrolled"
    report = result["report"]
    assert 0.5 < report["test_accuracy"] <= 1.0 and 0.0 <= report["detection_f1"] <= 1.0
    assert report["l2_strength"] != pytest.approx(float(torch.exp(torch.tensor(-4.0))), rel=1e-6)  # the top level moved


def test_hpo_reweight_comparison_configurations_are_valid() -> None:
    sys.path.insert(0, str(HERE.parent / "problems" / "hpo_reweight"))
    import compare

    for name, data in compare.configurations(seed=1, steps=2).items():
        loaded = spec_from_data(data)
        assert make_plan(compile_spec(loaded, "cpu")).reasons, name
