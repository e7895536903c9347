"""Run hooks shared by every problem family: optimizer hyperparameters tuned by upper variables,
weight decay, the monitor hook, report files, and engines that stop a run early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bilevel import build_engine, compile_spec, make_plan, run
from bilevel.engines import EngineBase, Hypergrad, Stats
from bilevel.engines import registry
from bilevel.engines.inner import start_state
from bilevel.engines import ImplicitConfig, UnrolledConfig
from bilevel.spec import SpecError, spec_from_data
from problems.toy import quadratic_spec, ridge_data, ridge_hypergrad, ridge_spec, ridge_val_data

HERE = Path(__file__).parent


def _hypergrad(spec, config):
    problem = compile_spec(spec)
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    return problem, engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


def _tuned_lr_spec(lr: float, steps: int = 15, solver: str = "sgd") -> dict:
    data = quadratic_spec(inner_steps=steps).model_dump(mode="json")
    data["levels"]["upper"]["variables"]["inner_lr"] = {"shape": [], "init": lr}
    data["levels"]["lower"]["solver"].update({"name": solver, "tuned": {"lr": "inner_lr"}})
    if solver == "momentum":
        data["levels"]["lower"]["solver"]["momentum"] = 0.5
    return data


@pytest.mark.parametrize("solver", ["sgd", "momentum", "adam"])
def test_tuned_inner_lr_gets_the_finite_difference_hypergradient(solver: str) -> None:
    """Unrolling through T optimizer steps differentiates the learning rate exactly (float64)."""
    lr = 0.05
    spec = spec_from_data(_tuned_lr_spec(lr, solver=solver))
    problem, result = _hypergrad(spec, UnrolledConfig())
    index = problem.upper.tensors["inner_lr"]
    analytic = float(result.grad[index])

    def loss_at(value: float) -> float:
        shifted = spec_from_data(_tuned_lr_spec(value, solver=solver))
        return float(_hypergrad(shifted, UnrolledConfig())[1].upper_loss)

    eps = 1e-6
    numeric = (loss_at(lr + eps) - loss_at(lr - eps)) / (2 * eps)
    assert analytic != 0.0
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_tuned_lr_leaves_the_other_hypergradient_unchanged() -> None:
    """With lr read from a variable equal to the spec's constant, the hypergradient in x is the same."""
    constant = quadratic_spec(inner_steps=15).model_dump(mode="json")
    constant["levels"]["lower"]["solver"]["lr"] = 0.05
    _, reference = _hypergrad(spec_from_data(constant), UnrolledConfig())
    problem, tuned = _hypergrad(spec_from_data(_tuned_lr_spec(0.05)), UnrolledConfig())
    x_index = problem.upper.tensors["x"]
    torch.testing.assert_close(tuned.grad[x_index], reference.grad[0], rtol=1e-12, atol=1e-14)


def _weight_decay_spec(tuned: bool) -> dict:
    data = ridge_spec(per_feature=False, inner_steps=800).model_dump(mode="json")
    # the data fit alone downstairs; the L2 term comes from the solver's weight decay exp(lam)
    data["levels"]["lower"]["objective"] = "problems.toy:ridge_upper"
    data["levels"]["upper"]["variables"] = {"wd": {"shape": [], "init": float(torch.exp(torch.tensor(-1.0)))}}
    data["levels"]["upper"]["objective"] = "problems.toy:ridge_upper"
    if tuned:
        data["levels"]["lower"]["solver"]["tuned"] = {"weight_decay": "wd"}
    return data


@pytest.mark.parametrize("config", [ImplicitConfig(), UnrolledConfig()], ids=["implicit", "unrolled"])
def test_tuned_weight_decay_matches_the_ridge_closed_form(config) -> None:
    """G = data fit + wd/2 ||w||^2 with wd = exp(lam): dF/dwd = (dF/dlam) / wd."""
    spec = spec_from_data(_weight_decay_spec(tuned=True))
    _, result = _hypergrad(spec, config)
    lam = torch.tensor(-1.0, dtype=torch.float64)
    expected = ridge_hypergrad(lam, ridge_data(), ridge_val_data()) / torch.exp(lam)
    assert abs(float(result.grad[0]) - float(expected)) <= 1e-6 * abs(float(expected))


def test_constant_weight_decay_is_part_of_the_lower_objective() -> None:
    data = _weight_decay_spec(tuned=False)
    data["levels"]["lower"]["solver"]["weight_decay"] = 0.5
    problem = compile_spec(spec_from_data(data))
    x, y = problem.fresh(problem.upper.init), (torch.ones(10, dtype=torch.float64),)
    batch = problem.lower.data.full
    plain = problem.lower.objective(problem.upper.view(x), problem.lower.view(y), batch)
    assert float(problem.lower_objective(x, y, batch) - plain) == pytest.approx(0.5 * 0.5 * 10)


def test_planner_picks_unrolled_for_a_tuned_lr_and_warns_for_implicit() -> None:
    loaded = spec_from_data(_tuned_lr_spec(0.05))
    problem = compile_spec(loaded)
    plan = make_plan(problem)
    assert plan.engine.kind == "unrolled"
    assert "tuned" in plan.reasons[0] and "lr" in plan.reasons[0]
    explicit = make_plan(problem, ImplicitConfig())
    assert any("zero" in w for w in explicit.warnings)


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (lambda d: d["levels"]["lower"]["solver"].update(tuned={"lr": "nope"}), "levels.lower.solver.tuned.lr", "not a tensor variable"),
        (lambda d: d["levels"]["lower"]["solver"].update(tuned={"lr": "x"}), "levels.lower.solver.tuned.lr", "must be a scalar"),
        (lambda d: d["levels"]["lower"]["solver"].update(tuned={"momentum": "inner_lr"}), "levels.lower.solver.tuned.momentum", "no momentum"),
        (lambda d: d["levels"]["upper"]["solver"].update(tuned={"lr": "inner_lr"}), "levels.upper.solver.tuned", "inner solver"),
        (lambda d: d["levels"]["lower"]["solver"].update(tuned={"beta": "inner_lr"}), "levels.lower.solver.tuned.beta", ""),
    ],
)
def test_bad_tuned_hyperparameters_are_clear_errors(change, path: str, message: str) -> None:
    data = _tuned_lr_spec(0.05)
    change(data)
    with pytest.raises(SpecError) as info:
        compile_spec(spec_from_data(data))
    text = str(info.value)
    assert path in text and message in text


# --- monitor and report files -------------------------------------------------------------------
def _hooked_spec(tmp_path: Path, **extra) -> dict:
    module = tmp_path / "hooks.py"
    module.write_text(
        "import json\n"
        "def monitor(upper, lower, *, step, out_dir, scale=1.0):\n"
        "    (out_dir / f'monitor-{step}.json').write_text(json.dumps({'step': step}))\n"
        "    return {'x0': scale * float(upper['x'][0]), 'y': lower['y'][:2]}\n"
        "def report(upper, lower, out_dir):\n"
        "    (out_dir / 'figure.txt').write_text('drawn')\n"
        "    return {'written': True}\n"
    )
    data = quadratic_spec(inner_steps=20, steps=7, out=str(tmp_path / "run")).model_dump(mode="json")
    data.update({"monitor": f"{module}:monitor", "monitor_kwargs": {"scale": 2.0}, "report": f"{module}:report", **extra})
    data["run"]["monitor_every"] = 3
    return data


def test_monitor_values_go_to_metrics_and_report_writes_files(tmp_path: Path) -> None:
    outcome = run(spec_from_data(_hooked_spec(tmp_path)), progress=False)
    records = [json.loads(line) for line in (outcome.out / "metrics.jsonl").read_text().splitlines()]
    monitored = {r["step"]: r["monitor"] for r in records if "monitor" in r}
    assert sorted(monitored) == [3, 6, 7]  # every 3 steps and after the last
    assert len(monitored[7]["y"]) == 2
    assert monitored[7]["x0"] == pytest.approx(2.0 * float(outcome.x[0][0]))
    assert (outcome.out / "monitor-6.json").exists()
    assert (outcome.out / "figure.txt").read_text() == "drawn"
    assert outcome.result["report"] == {"written": True}


def test_monitor_with_a_wrong_signature_is_a_spec_error(tmp_path: Path) -> None:
    data = _hooked_spec(tmp_path)
    (tmp_path / "bad.py").write_text("def monitor(upper, lower):\n    return {}\n")
    data["monitor"] = f"{tmp_path / 'bad.py'}:monitor"
    data["monitor_kwargs"] = {}
    with pytest.raises(SpecError) as info:
        compile_spec(spec_from_data(data))
    assert "monitor" in str(info.value) and "step" in str(info.value)


# --- engines that stop a run ----------------------------------------------------------------
class _StopsAtThree(EngineBase):
    kind = "stops_at_three"
    Config = ImplicitConfig
    capabilities = build_engine(ImplicitConfig()).capabilities

    def init(self, problem, x):
        return start_state(problem)

    def hypergrad(self, problem, x, state, batch):
        zero = torch.zeros((), dtype=problem.dtype)
        state.step += 1
        stop = "guard fired" if state.step > 3 else None
        grad = tuple(torch.ones_like(p) for p in x)
        return Hypergrad(grad, zero, state, Stats(zero, None, 0, 0, 0.0, {"eigenvalue": 1.5}), stop)


def test_an_engine_can_stop_the_run_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._ENGINES, "implicit", _StopsAtThree)
    spec = quadratic_spec(inner_steps=5, steps=10, out=str(tmp_path / "run"))
    outcome = run(spec, engine=ImplicitConfig(), progress=False)
    assert outcome.result["status"] == "stopped_early"
    assert outcome.result["stop_reason"] == "guard fired"
    assert outcome.result["steps"] == 3
    records = [json.loads(line) for line in (outcome.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["eigenvalue"] == 1.5
