"""Meta-learning over task distributions: MAML (any number of adaptation steps), first-order MAML,
Meta-SGD and iMAML against their closed forms on quadratic tasks (problems/meta/quadratic.py),
ANIL and MAML against central finite differences on the sinusoid network, second-order MAML
against higher and TorchOpt looping over the tasks, iMAML against TorchOpt's implicit
meta-gradient module; the planner's choices and refusals; the meta-test; bad input (float64)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bilevel import build_engine, compile_spec, make_plan, run
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.meta_test import meta_test, meta_test_run
from bilevel.spec import SpecError, load_spec, spec_from_data
from oracles import rel_error
from problems.meta.quadratic import closed_forms, task_spec
from problems.meta.sinusoid import mlp

ROOT = Path(__file__).resolve().parent.parent


def _meta_gradient(data: dict[str, Any], config: Any = None) -> tuple[Any, Any, Any]:
    """(problem, result, the meta-batch it used) of one meta-gradient at the initial meta-parameters."""
    problem = compile_spec(spec_from_data(data))
    engine = build_engine(config if config is not None else make_plan(problem).engine)
    x = problem.fresh(problem.upper.init)
    query = problem.upper.batch()  # draws the meta-batch; the task level reads its support sets
    tasks = problem.lower.data.stream.current
    return problem, engine.hypergrad(problem, x, engine.init(problem, x), query), tasks


# --- closed forms -----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_maml_meta_gradient_matches_the_closed_form(steps: int) -> None:
    problem, result, tasks = _meta_gradient(task_spec(steps=steps))
    assert result.estimate == "hypergradient"
    exact = closed_forms(problem.upper.init[0], tasks, 0.1, steps)
    assert rel_error(result.grad[0], exact["maml"]) < 1e-10
    assert float(result.upper_loss) == pytest.approx(float(exact["query_loss"]), rel=1e-12)


def test_zero_adaptation_steps_is_multi_task_training() -> None:
    problem, result, tasks = _meta_gradient(task_spec(steps=0))
    C, c = tasks["query"]["M"][:, 0], tasks["query"]["v"][:, 0]
    multi_task = ((C @ problem.upper.init[0]) - c).mean(0)  # the mean of the tasks' query gradients at theta
    assert rel_error(result.grad[0], multi_task) < 1e-12


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_maml_matches_its_closed_form(steps: int) -> None:
    problem, result, tasks = _meta_gradient(task_spec(steps=steps), UnrolledConfig(first_order=True))
    exact = closed_forms(problem.upper.init[0], tasks, 0.1, steps)
    assert rel_error(result.grad[0], exact["fomaml"]) < 1e-10
    assert rel_error(result.grad[0], exact["maml"]) > 1e-3  # a different estimator, not MAML under another name
    assert result.stats.hvp_count == 0


def test_meta_sgd_learns_a_learning_rate_per_entry() -> None:
    problem, result, tasks = _meta_gradient(task_spec(steps=1, per_entry_lr=True))
    theta, alpha = problem.upper.init
    exact = closed_forms(theta, tasks, alpha, 1)
    assert rel_error(result.grad[0], exact["maml"]) < 1e-10
    assert rel_error(result.grad[1], exact["metasgd_alpha"]) < 1e-10


def test_imaml_meta_gradient_matches_the_closed_form() -> None:
    data = task_spec(steps=300, prox=2.0)
    problem = compile_spec(spec_from_data(data))
    plan = make_plan(problem)
    assert plan.engine.kind == "implicit" and plan.engine.linear_solver.method == "cg"  # one CG per task
    _, result, tasks = _meta_gradient(data)
    exact = closed_forms(problem.upper.init[0], tasks, 0.1, 0, lam=2.0)
    assert rel_error(result.grad[0], exact["imaml"]) < 1e-10
    assert float((result.state.lower[0] - exact["imaml_solution"]).norm()) < 1e-10


# --- finite differences on the sinusoid network ------------------------------------------------------
def _sinusoid(preset: str, steps: int = 2, **top: Any) -> dict[str, Any]:
    data = load_spec(ROOT / "problems" / "meta" / f"{preset}.yaml").spec.model_dump(mode="json")
    data["run"]["dtype"] = "float64"
    data["levels"]["task"]["solver"]["steps"] = steps
    data["tasks"]["meta_batch"] = 3
    data.update(top)
    return data


def _central_differences(problem: Any, engine: Any, x: tuple, query: Any, index: int, entries: int, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the meta-objective in the first ``entries`` entries of x[index], on
    the same meta-batch (the stream is not advanced)."""
    out = []
    for k in range(entries):
        values = []
        for sign in (1.0, -1.0):
            shifted = [p.clone() for p in x]
            shifted[index].view(-1)[k] += sign * eps
            values.append(float(engine.hypergrad(problem, tuple(shifted), engine.init(problem, tuple(shifted)), query).upper_loss))
        out.append((values[0] - values[1]) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("preset", ["sinusoid_maml", "sinusoid_anil", "sinusoid_metasgd"])
def test_meta_gradients_on_the_sinusoid_network_match_finite_differences(preset: str) -> None:
    problem = compile_spec(spec_from_data(_sinusoid(preset)))
    engine = build_engine(make_plan(problem).engine)
    x = problem.fresh(problem.upper.init)
    query = problem.upper.batch()
    grad = engine.hypergrad(problem, x, engine.init(problem, x), query).grad
    for index in range(len(x)):  # every upper tensor (body, head, learning rates): its first entries
        fd = _central_differences(problem, engine, x, query, index, min(4, x[index].numel()))
        assert rel_error(grad[index].reshape(-1)[: fd.numel()], fd) < 1e-6, problem.upper.param_names[index]


# --- peers: higher and TorchOpt, looping over the tasks -------------------------------------------------
def _meta_batch_and_network() -> tuple[Any, Any, Any, torch.nn.Module]:
    problem = compile_spec(spec_from_data(_sinusoid("sinusoid_maml", steps=3)))
    query = problem.upper.batch()
    tasks = problem.lower.data.stream.current
    net = mlp().double()
    with torch.no_grad():
        for p, value in zip(net.parameters(), problem.upper.init):
            p.copy_(value)
    return problem, query, tasks, net


def test_second_order_maml_equals_higher_and_torchopt() -> None:
    higher = pytest.importorskip("higher")
    torchopt = pytest.importorskip("torchopt")
    problem, query, tasks, net = _meta_batch_and_network()
    engine = build_engine(UnrolledConfig())
    x = problem.fresh(problem.upper.init)
    ours = engine.hypergrad(problem, x, engine.init(problem, x), query).grad
    support, count = tasks["support"], problem.instances

    net.zero_grad()
    for i in range(count):  # higher: one differentiable copy per task
        with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.01), copy_initial_weights=False) as (fnet, opt):
            for _ in range(3):
                opt.step(F.mse_loss(fnet(support["x"][i]), support["y"][i]))
            (F.mse_loss(fnet(query["x"][i]), query["y"][i]) / count).backward()
    by_higher = [p.grad.clone() for p in net.parameters()]

    net.zero_grad()
    inner = torchopt.MetaSGD(net, lr=0.01)
    saved_net, saved_opt = torchopt.extract_state_dict(net, by="reference"), torchopt.extract_state_dict(inner, by="reference")
    for i in range(count):  # TorchOpt: the differentiable MetaSGD optimizer, state restored between tasks
        for _ in range(3):
            inner.step(F.mse_loss(net(support["x"][i]), support["y"][i]))
        (F.mse_loss(net(query["x"][i]), query["y"][i]) / count).backward()
        torchopt.recover_state_dict(net, saved_net)
        torchopt.recover_state_dict(inner, saved_opt)
    by_torchopt = [p.grad.clone() for p in net.parameters()]
    for a, b, c in zip(ours, by_higher, by_torchopt):
        assert rel_error(a, b) < 1e-6 and rel_error(a, c) < 1e-6


def test_imaml_equals_torchopts_implicit_meta_gradient_module() -> None:
    torchopt = pytest.importorskip("torchopt")
    lam, steps, cg_steps = 10.0, 40, 30  # lam large enough for H + lam I to be well conditioned on these tasks
    data = _sinusoid("sinusoid_imaml", steps=steps)
    data["levels"]["task"]["prox"]["lam"] = lam
    data["levels"]["task"]["solver"]["lr"] = 0.05
    config = ImplicitConfig(linear_solver=LinearSolverSpec(method="cg", maxiter=cg_steps, tol=0.0))
    problem = compile_spec(spec_from_data(data))
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init)
    query = problem.upper.batch()
    ours = engine.hypergrad(problem, x, engine.init(problem, x), query).grad
    tasks = problem.lower.data.stream.current
    _, _, _, meta = _meta_batch_and_network()
    with torch.no_grad():
        for p, value in zip(meta.parameters(), problem.upper.init):
            p.copy_(value)

    class Task(torchopt.nn.ImplicitMetaGradientModule,
               linear_solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0.0, atol=0.0)):
        def __init__(self, meta_net: torch.nn.Module):
            super().__init__()
            self.meta_net = meta_net
            self.net = torchopt.module_clone(meta_net, by="deepcopy", detach_buffers=True)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def objective(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            prox = sum(((p - m) ** 2).sum() for p, m in zip(self.parameters(), self.meta_parameters()))
            return F.mse_loss(self(inputs), targets) + 0.5 * lam * prox

        def solve(self, inputs: torch.Tensor, targets: torch.Tensor) -> "Task":
            params = tuple(self.parameters())
            with torch.enable_grad():
                for _ in range(steps):
                    grads = torch.autograd.grad(self.objective(inputs, targets), params)
                    with torch.no_grad():
                        for p, g in zip(params, grads):
                            p.sub_(0.05 * g)
            return self

    meta.zero_grad()
    count = problem.instances
    for i in range(count):
        solved = Task(meta).solve(tasks["support"]["x"][i], tasks["support"]["y"][i])
        (F.mse_loss(solved(query["x"][i]), query["y"][i]) / count).backward()
    for a, p in zip(ours, meta.parameters()):
        assert rel_error(a, p.grad) < 1e-6


# --- the planner and bad input ---------------------------------------------------------------------------
def test_the_planner_unrolls_a_level_started_at_upper_variables_and_says_why() -> None:
    plan = make_plan(compile_spec(spec_from_data(task_spec(steps=2))))
    assert plan.engine.kind == "unrolled" and plan.engine.truncate is None
    assert "levels.task.init_from" in plan.reasons[0] and "no meta-gradient through the start" in plan.reasons[0]


def test_memory_estimates_count_this_ranks_tasks_under_a_data_parallel_split() -> None:
    """A meta-batch split over ranks: each process stores the unrolled steps of its own slice
    of tasks, so the estimate that decides checkpointing scales with the slice (3 of 5, 2 of 5)."""
    from bilevel.distributed.reduce import World, activate
    from bilevel.planner import ProblemFacts

    data = _sinusoid("sinusoid_maml")
    data["tasks"]["meta_batch"] = 5
    problem = compile_spec(spec_from_data(data))
    whole = ProblemFacts.of(problem)
    assert whole.task_share == 1.0
    for rank, share in ((0, 3 / 5), (1, 2 / 5)):
        previous = activate(World(rank=rank, size=2))
        try:
            facts = ProblemFacts.of(problem)
        finally:
            activate(previous)
        assert facts.task_share == share
        assert facts.unrolled_memory_mb(10) == pytest.approx(share * whole.unrolled_memory_mb(10), rel=1e-12)


BAD = {
    "implicit without prox": (lambda d: d.update(engine={"kind": "implicit"}), "levels.task.init_from", "identically zero"),
    "truncation": (lambda d: d.update(engine={"kind": "unrolled", "truncate": 1}), "engine.truncate", "drops the meta-gradient"),
    "first order without init_from": (lambda d: (d["levels"]["task"].pop("init_from"), d.update(engine={"kind": "unrolled", "first_order": True})),
                                      "engine.first_order", "declare init_from"),
    "prox lam zero": (lambda d: d["levels"]["task"].update(prox={"anchor": "theta", "lam": 0.0}), "levels.task.prox.lam", "greater than 0"),
    "init_from of another shape": (lambda d: (d["levels"]["meta"]["variables"].update(other={"shape": [3]}),
                                            d["levels"]["task"].update(init_from="other")), "levels.task.init_from", "same shape"),
    "init_from of nothing": (lambda d: d["levels"]["task"].update(init_from="nope"), "levels.task.init_from", "not a variable"),
    "mismatched support and query": (lambda d: d["tasks"].update(sampler=f"{ROOT / 'tests' / 'runtime_data' / 'bad_tasks.py'}:mismatched"),
                                     "tasks.sampler", "same names"),
    "wrong task count": (lambda d: d["tasks"].update(sampler=f"{ROOT / 'tests' / 'runtime_data' / 'bad_tasks.py'}:one_task"),
                         "tasks.sampler", "leading dimension of 5 tasks"),
    "data besides tasks": (lambda d: d["levels"]["task"].update(data={"source": "problems.toy:quadratic_data"}),
                           "levels.task.data", "task sampler gives this level"),
    "penalty on tasks": (lambda d: d.update(engine={"kind": "penalty"}), "tasks", "does not support a batch of tasks"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_meta_learning_input_names_the_field(case: str) -> None:
    data = task_spec(steps=2)
    mutate, path, message = BAD[case]
    mutate(data)
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert any(issue.path == path and message in issue.message for issue in info.value.issues), str(info.value)


def test_bad_meta_learning_input_exits_2_on_the_command_line(tmp_path: Path) -> None:
    data = task_spec(steps=2)
    data["engine"] = {"kind": "implicit"}
    (tmp_path / "spec.json").write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "-m", "bilevel", "validate", str(tmp_path / "spec.json")], capture_output=True, text=True)
    assert done.returncode == 2 and "levels.task.init_from" in done.stderr and "Traceback" not in done.stderr


# --- runs, resume and the meta-test ---------------------------------------------------------------------
def test_a_meta_learning_run_reports_its_meta_test_and_resumes_bit_identically(tmp_path: Path) -> None:
    data = task_spec(steps=1)
    data["run"].update(steps=6, checkpoint_every=3)
    reference = run(spec_from_data(data), out=tmp_path / "ref", progress=False)
    meta = reference.result["meta_test"]
    assert meta["tasks"] == 20 and set(meta["steps"]) == {"0", "1"}
    assert meta["steps"]["1"]["query_loss"]["n"] == 20
    short = {**data, "run": {**data["run"], "steps": 3}}
    run(spec_from_data(short), out=tmp_path / "resumed", progress=False)
    resumed = run(spec_from_data(data), out=tmp_path / "resumed", resume=True, progress=False)
    assert resumed.result["upper_variables"] == reference.result["upper_variables"]
    again = meta_test_run(tmp_path / "ref", tasks=20, steps=[0, 1])
    assert again["steps"] == meta["steps"]  # the meta-test stream is its own, seeded


def test_meta_test_scores_improve_with_adaptation_steps_on_quadratic_tasks() -> None:
    problem = compile_spec(spec_from_data(task_spec(steps=5)))
    x = problem.fresh(problem.upper.init)
    result = meta_test(problem, x, tasks=50, steps=[0, 1, 5])
    losses = [result["steps"][s]["query_loss"]["mean"] for s in ("0", "1", "5")]
    assert losses[0] > losses[1] > losses[2]


def test_meta_test_command_prints_each_step_count(tmp_path: Path) -> None:
    data = task_spec(steps=1)
    run(spec_from_data(data), out=tmp_path / "run", progress=False)
    done = subprocess.run([sys.executable, "-m", "bilevel", "meta-test", str(tmp_path / "run"), "--tasks", "10",
                           "--steps", "0,1,4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "10 tasks" in done.stdout and all(f"{s:>3} steps" in done.stdout for s in (0, 1, 4))
    bad = subprocess.run([sys.executable, "-m", "bilevel", "meta-test", str(tmp_path / "run"), "--steps", "one"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps" in bad.stderr


def test_the_plain_reference_implementation_runs() -> None:
    from problems.meta.plain_reference import train

    for method, init in (("maml", "torch"), ("fomaml", "torch"), ("fomaml", "finn")):
        result = train(method, seed=0, steps=3, tasks=8, init=init)
        assert set(result) == {0, 1, 10}
        assert all(math.isfinite(mean) and ci >= 0 for mean, ci in result.values())
        assert result[10][0] < result[0][0]  # adapting to a task's support lowers its query error
