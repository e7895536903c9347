"""Forward-mode hypergradients (FHG, RTHO; Franceschi et al. 2017) against reverse-mode unrolling
through the same steps, in float64: the two compute one derivative in opposite orders, so they
agree to rounding for every inner optimizer, tuned hyperparameter and schedule."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bilevel import build_engine, compile_spec
from bilevel.engines import ForwardConfig, UnrolledConfig
from bilevel.spec import spec_from_data
from oracles import quadratic_hypergrad, quadratic_data, rel_error
from problems.toy import quadratic_spec

SOLVERS = {"sgd": {"lr": 0.05}, "momentum": {"lr": 0.05, "momentum": 0.5}, "adam": {"lr": 0.01}}


def _quadratic(solver: str, steps: int = 25, tuned: dict[str, str] | None = None, **extra: Any) -> dict:
    data = quadratic_spec(inner_steps=steps).model_dump(mode="json")
    upper = data["levels"]["upper"]["variables"]
    upper["inner_lr"] = {"shape": [], "init": SOLVERS[solver]["lr"]}
    upper["mu"] = {"shape": [], "init": 0.5}
    upper["wd"] = {"shape": [], "init": 0.05}
    data["levels"]["lower"]["solver"].update({"name": solver, **SOLVERS[solver], "tuned": tuned or {"lr": "inner_lr"}, **extra})
    return data


def _mlp(solver: str, steps: int = 12, **extra: Any) -> dict:
    """A small MLP on digits (40 training examples), lr and weight decay tuned."""
    kwargs = {"n_train": 40, "n_val": 40}
    return {
        "levels": {
            "upper": {
                "variables": {"lr": {"shape": [], "init": SOLVERS[solver]["lr"]}, "wd": {"shape": [], "init": 1e-3}},
                "objective": "problems.hpo.digits:mlp_upper",
                "data": {"source": "problems.hpo.digits:val_data", "kwargs": kwargs},
            },
            "lower": {
                "parent": "upper",
                "variables": {"net": {"kind": "module", "factory": "problems.hpo.digits:Mlp", "kwargs": {"hidden": [6]}}},
                "objective": "problems.hpo.digits:mlp_lower",
                "data": {"source": "problems.hpo.digits:train_data", "kwargs": kwargs},
                "solver": {"name": solver, **SOLVERS[solver], "steps": steps, "warm_start": False,
                           "tuned": {"lr": "lr", "weight_decay": "wd"}, **extra},
            },
        },
        "run": {"dtype": "float64", "device": "cpu", "seed": 0},
    }


def _both(data: dict, calls: int = 1) -> tuple[Any, Any]:
    """The last of ``calls`` successive hypergradients of unrolled and forward, same RNG."""
    problem = compile_spec(spec_from_data(data))
    out = []
    for config in (UnrolledConfig(), ForwardConfig()):
        torch.manual_seed(0)
        engine = build_engine(config)
        x = problem.fresh(problem.upper.init)
        state = engine.init(problem, x)
        for _ in range(calls):
            result = engine.hypergrad(problem, x, state, problem.upper.batch())
            state = result.state
        out.append(result)
    return problem, out


def _assert_same(reverse: Any, forward: Any, tol: float = 1e-10) -> None:
    for a, b in zip(reverse.grad, forward.grad):
        assert float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max())), (a, b)
    assert float(reverse.upper_loss) == pytest.approx(float(forward.upper_loss), rel=1e-14)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_forward_equals_unrolled_with_a_tuned_lr(solver: str) -> None:
    problem, (reverse, forward) = _both(_quadratic(solver))
    _assert_same(reverse, forward)
    lr = problem.upper.tensors["inner_lr"]
    assert float(forward.grad[lr].abs()) > 1e-6  # the lr's hypergradient is not trivially zero
    assert forward.stats.hvp_count == 25 * 6 and forward.stats.inner_steps == 25


def test_forward_equals_unrolled_with_tuned_momentum_and_weight_decay() -> None:
    data = _quadratic("momentum", tuned={"lr": "inner_lr", "momentum": "mu", "weight_decay": "wd"})
    problem, (reverse, forward) = _both(data)
    _assert_same(reverse, forward)
    for name in ("inner_lr", "mu", "wd"):
        assert float(forward.grad[problem.upper.tensors[name]].abs()) > 1e-6


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_forward_equals_unrolled_on_an_mlp(solver: str) -> None:
    _, (reverse, forward) = _both(_mlp(solver))
    _assert_same(reverse, forward)


def test_forward_equals_unrolled_with_warm_starts_and_hypergradient_descent() -> None:
    """Three warm-started calls (each differentiates its own solve) through sgd whose lr adapts
    itself (Baydin et al. 2018: the adapted lr is state, with a tangent of its own)."""
    data = _quadratic("sgd", tuned={"weight_decay": "wd"}, lr_hypergradient=1e-3)
    _, (reverse, forward) = _both(data, calls=3)
    _assert_same(reverse, forward)


def test_forward_hypergradient_matches_the_closed_form_when_converged() -> None:
    problem = compile_spec(quadratic_spec(inner_steps=400))
    x = problem.fresh(problem.upper.init)
    engine = build_engine(ForwardConfig())
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    assert rel_error(result.grad[0], quadratic_hypergrad(x[0], quadratic_data())) < 1e-10


# --- schedules ---------------------------------------------------------------------------------
def _scheduled(solver: str, k: int, steps: int = 24, init: float | None = None) -> dict:
    data = _quadratic(solver, steps=steps)
    lr = SOLVERS[solver]["lr"] if init is None else init
    data["levels"]["upper"]["variables"]["inner_lr"] = {"shape": [k], "init": lr}
    data["levels"]["lower"]["solver"]["tuned_schedule"] = {"hyperparameters": ["lr"]}
    return data


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_a_schedule_gets_the_same_hypergradient_forward_and_reverse(solver: str) -> None:
    problem, (reverse, forward) = _both(_scheduled(solver, k=4))
    _assert_same(reverse, forward)
    entries = forward.grad[problem.upper.tensors["inner_lr"]]
    assert entries.shape == (4,) and bool((entries != 0).all())


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_a_flat_schedule_is_the_constant_lr_and_its_entries_sum_to_its_hypergradient(solver: str) -> None:
    """K equal entries follow the constant lr's trajectory; by the chain rule the entries'
    hypergradients (each the derivative through its block of steps) sum to the scalar's."""
    problem, (_, scheduled) = _both(_scheduled(solver, k=3))
    scalar_problem, (_, scalar) = _both(_quadratic(solver, steps=24))
    assert float(scheduled.upper_loss) == pytest.approx(float(scalar.upper_loss), rel=1e-14)
    total = scheduled.grad[problem.upper.tensors["inner_lr"]].sum()
    assert float(total) == pytest.approx(float(scalar.grad[scalar_problem.upper.tensors["inner_lr"]]), rel=1e-10)


def test_a_schedule_entry_matches_finite_differences_through_checkpointed_unrolling() -> None:
    """Entry k only acts on steps [k T / K, (k + 1) T / K): a central difference of the upper loss
    in one entry equals its hypergradient, checkpointed or stored (float64)."""
    data = _scheduled("momentum", k=4)
    problem = compile_spec(spec_from_data(data))
    x = problem.fresh(problem.upper.init)
    index = problem.upper.tensors["inner_lr"]

    def loss_and_grad(values: torch.Tensor, config: Any) -> tuple[float, torch.Tensor]:
        engine = build_engine(config)
        point = tuple(values if i == index else p for i, p in enumerate(x))
        out = engine.hypergrad(problem, point, engine.init(problem, point), problem.upper.batch())
        return float(out.upper_loss), out.grad[index]

    base = x[index].clone()
    _, stored = loss_and_grad(base, UnrolledConfig())
    _, checkpointed = loss_and_grad(base, UnrolledConfig(checkpoint_every=5))
    torch.testing.assert_close(checkpointed, stored, rtol=1e-10, atol=1e-14)
    eps = 1e-6
    for k in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[k] = eps
        numeric = (loss_and_grad(base + step, ForwardConfig())[0] - loss_and_grad(base - step, ForwardConfig())[0]) / (2 * eps)
        assert abs(numeric - float(stored[k])) <= 1e-6 * max(1.0, abs(numeric))


def test_a_schedule_indexes_its_blocks_of_steps() -> None:
    """With K = T, entry t is the learning rate of step t alone: zeroing the last two entries
    freezes the last two steps, so the iterate equals that of two steps fewer."""
    problem = compile_spec(spec_from_data(_scheduled("sgd", k=6, steps=6)))
    shorter = compile_spec(spec_from_data(_quadratic("sgd", steps=4)))
    lowers = []
    for p, lr in ((problem, torch.tensor([0.05] * 4 + [0.0] * 2, dtype=torch.float64)), (shorter, None)):
        engine = build_engine(ForwardConfig())
        x = tuple(lr if lr is not None and i == p.upper.tensors["inner_lr"] else v for i, v in enumerate(p.fresh(p.upper.init)))
        lowers.append(engine.hypergrad(p, x, engine.init(p, x), p.upper.batch()).state.lower[0])
    torch.testing.assert_close(lowers[0], lowers[1], rtol=0, atol=0)


# --- RTHO ----------------------------------------------------------------------------------------
def test_rtho_carries_the_tangents_across_calls() -> None:
    """With x held fixed, k online calls of Delta steps each are one run of k Delta steps: the
    hypergradient after them equals reverse mode through all k Delta steps from the start."""
    online = _quadratic("momentum", steps=7)
    problem = compile_spec(spec_from_data(online))
    engine = build_engine(ForwardConfig(online=True))
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    for _ in range(3):
        result = engine.hypergrad(problem, x, state, problem.upper.batch())
        state = result.state
    whole = _quadratic("momentum", steps=21)
    whole["levels"]["lower"]["solver"]["warm_start"] = False
    reference_problem = compile_spec(spec_from_data(whole))
    reference_engine = build_engine(UnrolledConfig())
    reference = reference_engine.hypergrad(reference_problem, x, reference_engine.init(reference_problem, x),
                                           reference_problem.upper.batch())
    _assert_same(reference, result)
    assert engine.lower_solution(problem, x, state) is state.lower  # the run as RTHO left it


# --- planning -------------------------------------------------------------------------------------
def test_the_planner_picks_forward_for_a_few_hyperparameters_over_a_long_horizon() -> None:
    from bilevel import make_plan

    long = make_plan(compile_spec(spec_from_data(_quadratic("momentum", steps=400))))
    assert long.engine.kind == "forward" and not long.engine.online
    memory = long.reasons[1]
    assert "6 upper scalars over a horizon of 400 inner steps" in memory and "MiB whatever the horizon" in memory
    assert "would store the 400 steps" in memory
    short = make_plan(compile_spec(spec_from_data(_quadratic("momentum", steps=40))))
    assert short.engine.kind == "unrolled"  # a short horizon: reverse mode is cheap
    many = _quadratic("momentum", steps=400)
    many["levels"]["upper"]["variables"]["x"]["shape"] = [20]
    many["levels"]["lower"]["data"]["kwargs"]["m"] = 20
    many["levels"]["upper"]["data"]["kwargs"]["m"] = 20
    assert make_plan(compile_spec(spec_from_data(many))).engine.kind == "unrolled"  # 23 upper scalars: reverse mode


def test_forward_refuses_a_closed_form_lower_level(tmp_path: Any) -> None:
    import yaml
    from typer.testing import CliRunner

    from bilevel.cli import app
    from problems.toy import ridge_spec

    from pathlib import Path

    data = ridge_spec().model_dump(mode="json")
    data["levels"]["lower"]["solution"] = f"{Path(__file__).parent / 'runtime_data' / 'closed_form.py'}:solution"
    data["engine"] = {"kind": "forward"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "levels.lower.solution" in result.output and "engine: implicit" in result.output and "spec.yaml" in result.output


def test_rtho_resumes_with_its_tangents(tmp_path: Any) -> None:
    """The carried tangents are engine state: 3 steps, a checkpoint, 3 more after --resume equal 6 in one go."""
    from bilevel import run

    def spec(steps: int) -> Any:
        data = _quadratic("momentum", steps=5, tuned={"lr": "inner_lr", "momentum": "mu"})
        data["run"] = {**data.get("run", {}), "steps": steps, "checkpoint_every": 3, "dtype": "float64"}
        data["engine"] = {"kind": "forward", "online": True}
        data["levels"]["upper"]["solver"] = {"name": "adam", "lr": 0.002}
        return spec_from_data(data)

    whole = run(spec(6), out=tmp_path / "whole", progress=False)
    run(spec(3), out=tmp_path / "split", progress=False)
    resumed = run(spec(6), out=tmp_path / "split", resume=True, progress=False)
    for a, b in zip(whole.x, resumed.x):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_schedule_problem_runs_online_and_its_baselines_train(tmp_path: Any) -> None:
    """problems/schedule: two RTHO updates of (lr, momentum) on the digits MLP, and a hand-tuned baseline."""
    from bilevel import run
    from problems.schedule import hand_tuned, schedule_spec

    result = run(schedule_spec(steps=2, delta=5), out=tmp_path, progress=False).result
    assert result["engine"] == "forward" and result["engine_config"]["online"]
    assert 0.0 < result["report"]["test_accuracy"] <= 1.0 and result["upper_variables"]["lr"] != 0.01
    baseline = hand_tuned("cosine", steps=10, grid=(0.03, 0.1))
    assert baseline["lr"] in (0.03, 0.1) and 0.0 < baseline["test_accuracy"] <= 1.0
