"""A batch of independent instances solved as one: each instance's batched hypergradient is its
own single-instance hypergradient (float64, 1e-10), the runtime reports per-instance results,
and what would couple instances is refused with a SpecError naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel import run
from bilevel.compile import compile_spec
from bilevel.engines import build_engine
from bilevel.fastpath import ReplayBackend, set_graph_backend
from bilevel.compile.instances import instance_specs
from bilevel.planner import make_plan
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.spec import SpecError, spec_from_data
from helpers import hypergrad_calls

N = 3


def batched_spec(batch_size: int | None = None, solver: dict | None = None, vary: dict | None = None, **top: Any) -> dict:
    kwargs = {"dataset": "mixture", "n_train": 90, "n_val": 90, "d": 10, "classes": 4, "seed": 0}
    data = {
        "name": "instances-test",
        "levels": {
            "upper": {"variables": {"lam": {"shape": [90], "init": 0.0}}, "objective": "problems.hyperclean:upper_objective",
                      "data": {"source": "problems.hyperclean:val_data", "kwargs": kwargs},
                      "solver": {"name": "adam", "lr": 0.1}},
            "lower": {"parent": "upper", "variables": {"W": {"shape": [4, 10], "init": "normal", "init_scale": 0.1}, "b": {"shape": [4]}},
                      "objective": "problems.hyperclean:lower_objective", "objective_kwargs": {"mu": 1e-2},
                      "data": {"source": "problems.hyperclean:train_data", "kwargs": kwargs, "batch_size": batch_size},
                      "solver": {"name": "sgd", "lr": 0.2, "steps": 15, "warm_start": True, **(solver or {})},
                      "assumptions": {"convexity": "strongly_convex"}},
        },
        "run": {"device": "cpu", "dtype": "float64", "seed": 0, "steps": 3, "checkpoint_every": 1},
        "instances": {"count": N, "vary": vary if vary is not None else {
            "levels.lower.data.kwargs.seed": [0, 1, 2],                 # each instance its own data...
            "levels.upper.data.kwargs.seed": [0, 1, 2],
            "levels.lower.objective_kwargs.mu": [1e-2, 3e-2, 1e-1],     # ...its own regularization
            "levels.upper.variables.lam.init": [0.0, 0.5, -0.5],        # ...and its own starting point
        }},
    }
    data.update(top)
    return data


CONFIGS = [
    ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=6)),  # CG far from converged: per-instance steps matter
    ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=10)),
    UnrolledConfig(),
    UnrolledConfig(checkpoint_every=4, truncate=10),
]


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("batch_size", [None, 30])
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_each_instance_gets_its_own_hypergradient(config, batch_size, vectorize: str) -> None:
    loaded = spec_from_data(batched_spec(batch_size=batch_size))
    batched = compile_spec(loaded)
    assert batched.stacked is not None and batched.instances == N
    assert batched.stacked.vectorize == "loop"  # CPU, per-instance data: see bilevel.problem.stack.vectorization
    batched.stacked.vectorize = vectorize
    singles = [compile_spec(one) for one in instance_specs(loaded)]
    got = hypergrad_calls(build_engine(config), batched, 2)  # two warm-started calls: the CG warm start is per instance too
    upper_losses = 0.0
    for k, single in enumerate(singles):
        want = hypergrad_calls(build_engine(config), single, 2)
        for a, b in zip(got, want):
            assert float((a.grad[0][k] - b.grad[0]).norm() / b.grad[0].norm()) < 1e-10
            for u, v in zip(a.state.lower, b.state.lower):
                assert float((u[k] - v).norm()) <= 1e-10 * float(v.norm())
        upper_losses += float(want[0].upper_loss)
    assert float(got[0].upper_loss) == pytest.approx(upper_losses, rel=1e-12)  # the batch's loss is their sum


def test_shared_data_enters_vmap_once() -> None:
    batched = compile_spec(spec_from_data(batched_spec(vary={"levels.upper.variables.lam.init": [0.0, 1.0, 2.0]})))
    assert batched.lower.data.in_dims == {"x": None, "y": None, "index": None} and batched.stacked.vectorize == "vmap"
    assert batched.lower.data.full["x"].shape == (90, 10)  # not copied N times
    varied = compile_spec(spec_from_data(batched_spec()))
    assert varied.lower.data.in_dims == {"x": 0, "y": 0, "index": None}
    assert varied.lower.data.full["x"].shape == (N, 90, 10)


def test_captured_batched_hypergradients_equal_eager_ones() -> None:
    """The batch is an ordinary problem to the fast path: one captured graph serves all instances."""
    problem = compile_spec(spec_from_data(batched_spec()))
    eager = hypergrad_calls(build_engine(ImplicitConfig(fast_path="off")), problem, 3)
    set_graph_backend(ReplayBackend, capture_at_sighting=1)
    try:
        config = ImplicitConfig(fast_path="cuda_graph")
        engine = build_engine(config)
        x = problem.fresh(problem.upper.init)
        state = engine.init(problem, x)
        for want in eager:
            got = engine.hypergrad(problem, x, state, problem.upper.batch())
            state = got.state
            assert torch.equal(got.grad[0], want.grad[0])
        assert engine.execution_report()["hypergradient"] == "cuda_graph"
    finally:
        set_graph_backend(None)


def test_a_run_reports_every_instance_and_resumes(tmp_path) -> None:
    data = batched_spec(batch_size=30, report="problems.hyperclean:report",
                        report_kwargs={"dataset": "mixture", "n_train": 90, "n_val": 90, "d": 10, "classes": 4, "baselines": False})
    data["instances"]["vary"] = {"levels.upper.variables.lam.init": [0.0, 0.5, -0.5]}  # the report reads the default data
    # rounding differs between batched and single kernels (reduction order); keep it from being
    # amplified: plain SGD upstairs (Adam's g / sqrt(v) blows it up on near-zero entries) and few
    # CG steps without a tolerance (on this ill-conditioned minibatch Hessian, 20 CG steps grow
    # 1e-16 differences to 1e-8, and a stopping test can flip)
    data["levels"]["upper"]["solver"] = {"name": "sgd", "lr": 10.0}
    data["engine"] = {"kind": "implicit", "linear_solver": {"tol": 0.0, "maxiter": 6}}
    loaded = spec_from_data(data)
    done = run(loaded, out=tmp_path / "a", progress=False)
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert len(result["instances"]) == N
    assert [i["vary"]["levels.upper.variables.lam.init"] for i in result["instances"]] == [0.0, 0.5, -0.5]
    assert sum(i["final_upper_loss"] for i in result["instances"]) == pytest.approx(result["final_upper_loss"], rel=1e-9)
    assert all(0.0 <= i["report"]["test_accuracy"] <= 1.0 for i in result["instances"])
    assert len(result["upper_variables"]["lam"]) == N
    # each instance's trajectory is its own single-instance run
    for k, one in enumerate(instance_specs(loaded)):
        alone = run(one, out=tmp_path / f"single{k}", progress=False)
        assert float((done.x[0][k] - alone.x[0]).norm()) <= 1e-9 * float(alone.x[0].norm())
    # killed after 2 of 3 steps and resumed: the same result (stacked streams and state restored)
    short = dict(data, run={**data["run"], "steps": 2})
    run(spec_from_data(short), out=tmp_path / "b", progress=False)
    resumed = run(loaded, out=tmp_path / "b", resume=True, progress=False)
    assert torch.equal(resumed.x[0], done.x[0])


def _error(data: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        loaded = spec_from_data(data)
        problem = compile_spec(loaded)
        make_plan(problem)
    return info.value


@pytest.mark.parametrize("change, path, words", [
    (lambda d: d["instances"]["vary"].update({"levels.lower.solver.lr": [0.1, 0.2, 0.3]}), "instances", "cannot differ"),
    (lambda d: d["instances"]["vary"].update({"run.seed": [1, 2]}), "instances", "one per instance"),
    (lambda d: d["instances"]["vary"].update({"levels.lower.objective_kwargs.mu": ["a", "b", "c"]}), "instances", "numbers"),
    (lambda d: d["instances"]["vary"].update({"levels.lowr.data.kwargs.seed": [1, 2, 3]}), "instances.vary", "no level"),
    (lambda d: (d["levels"]["lower"].update(variables={"net": {"kind": "module", "factory": "problems.hyperclean:mlp",
                                                                "kwargs": {"d_in": 10, "hidden": 5, "classes": 4}}}),
                d["instances"]["vary"].update({"levels.lower.variables.net.kwargs.hidden": [5, 6, 5]})), "instances.vary", "shape"),
    (lambda d: d["instances"]["vary"].update({"levels.lower.variables.W.kwargs.x": [1, 2, 3]}), "instances.vary", "no field"),
    (lambda d: d.update(engine={"kind": "penalty"}), "instances", "does not support"),
    (lambda d: d.update(engine={"kind": "implicit", "linear_solver": {"method": "direct"}}), "engine.linear_solver.method", "direct"),
    (lambda d: d["levels"]["upper"]["solver"].update(name="normalized_momentum"), "levels.upper.solver.name", "couple"),
])
def test_what_would_couple_instances_is_refused(change, path: str, words: str) -> None:
    data = batched_spec()
    change(data)
    error = _error(data)
    assert any(issue.path.startswith(path) and words in issue.message for issue in error.issues), error


def test_the_planner_keeps_a_batch_on_cg() -> None:
    data = batched_spec()
    data["levels"]["lower"]["variables"] = {"w": {"shape": [2]}}  # tiny: alone it would get a direct solve
    data["levels"]["lower"]["objective"] = "problems.toy:ridge_lower"
    data["levels"]["upper"]["objective"] = "problems.toy:ridge_upper"
    data["levels"]["upper"]["variables"] = {"lam": {"shape": [2]}}
    for level, source in (("lower", "problems.toy:ridge_data"), ("upper", "problems.toy:ridge_val_data")):
        data["levels"][level]["data"] = {"source": source, "kwargs": {"d": 2}}
    data["levels"]["lower"]["objective_kwargs"] = {}
    data["instances"] = {"count": 2}
    loaded = spec_from_data(data)
    plan = make_plan(compile_spec(loaded))
    assert plan.engine.kind == "implicit" and plan.engine.linear_solver.method == "cg"


def test_the_seeds_preset_runs_every_seed(tmp_path) -> None:
    """problems/hyperclean/digits_seeds.yaml: 8 seeds in one run, each with its own report."""
    from bilevel.presets import find_preset
    from bilevel.spec import load_spec

    loaded = load_spec(find_preset("hyperclean/digits_seeds"), ["run.steps=2", "levels.lower.solver.steps=10"])
    result = run(loaded, out=tmp_path, progress=False).result
    assert [item["index"] for item in result["instances"]] == list(range(8))
    accuracies = [item["report"]["test_accuracy"] for item in result["instances"]]
    assert len(set(accuracies)) > 1 and all(0.5 < a <= 1.0 for a in accuracies)  # different data, sensible models


def test_a_monitor_is_called_per_instance(tmp_path) -> None:
    objectives = Path(__file__).resolve().parent / "fastpath_data" / "objectives.py"
    data = batched_spec(monitor=f"{objectives}:lam_mean", monitor_kwargs={"scale": 2.0})
    data["run"]["monitor_every"] = 1
    data["run"]["steps"] = 2
    run(spec_from_data(data), out=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["monitor"]["instances"] for r in records if "monitor" in r]
    assert len(per_step) == 2 and all(len(entries) == N for entries in per_step)
    first = per_step[0]
    assert [e["step"] for e in first] == [1, 1, 1]
    assert first[1]["lam_mean"] > first[0]["lam_mean"] > first[2]["lam_mean"]  # init 0.5, 0.0, -0.5 (times 2)
    assert (tmp_path / "instance_2").is_dir()
