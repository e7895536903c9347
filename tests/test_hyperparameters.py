"""Hyperparameter variables: declared in user units, validated, optimized as raw tensors; objectives,
tuned optimizer settings, monitors and result.json see the values; the planner refuses engines that
cannot take discrete or non-differentiable ones and picks STN for them."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bilevel import build_engine, compile_spec, make_plan, run
from bilevel.cli import app
from bilevel.hyperparameters import Categorical, Continuous, Integer, make_transform
from bilevel.engines import ImplicitConfig, StnConfig, UnrolledConfig
from bilevel.spec import HyperparameterVariable, SpecError, spec_from_data
from problems.toy import ridge_data, ridge_hypergrad, ridge_spec, ridge_val_data

HERE = Path(__file__).parent
RIDGE = str(HERE / "runtime_data" / "hyper_ridge.py")
runner = CliRunner()
F64 = {"device": torch.device("cpu"), "dtype": torch.float64}


def _hp(**fields) -> HyperparameterVariable:
    return HyperparameterVariable(kind="hyperparameter", **fields)


# --- transforms -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"low": 0.0, "high": 0.8}, {"low": 1e-5, "high": 1.0, "log": True}, {}, {"log": True}, {"low": -3.0, "high": 2.0},
])
def test_continuous_value_inverts_its_raw_init_and_stays_in_range(fields) -> None:
    transform, _ = make_transform(_hp(**fields), **F64)
    assert isinstance(transform, Continuous)
    for value in (0.3, 0.5) if fields.get("high", 1) >= 0.8 and not fields.get("log") else (1e-3, 0.5):
        raw = torch.tensor(transform.raw_of(value), dtype=torch.float64)
        assert float(transform.value(raw)) == pytest.approx(value, rel=1e-12)
    extremes = transform.value(torch.tensor([-40.0, 40.0], dtype=torch.float64))
    assert torch.isfinite(extremes).all()
    if "low" in fields:
        assert fields["low"] <= float(extremes[0]) < float(extremes[1]) <= fields["high"]


def test_default_inits_are_the_middle_of_the_range() -> None:
    for fields, middle in [({"low": 0.0, "high": 0.8}, 0.4), ({"low": 1e-4, "high": 1.0, "log": True}, 1e-2), ({"log": True}, 1.0)]:
        transform, raw = make_transform(_hp(**fields), **F64)
        assert float(transform.value(raw)) == pytest.approx(middle, rel=1e-12)


def test_bounded_log_scale_is_a_scaled_sigmoid_on_log_value() -> None:
    transform, _ = make_transform(_hp(low=1e-4, high=1.0, log=True), **F64)
    raw = torch.linspace(-5, 5, 11, dtype=torch.float64)
    expected = torch.exp(math.log(1e-4) + (0 - math.log(1e-4)) * torch.sigmoid(raw))
    torch.testing.assert_close(transform.value(raw), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("log", [False, True])
def test_integer_owns_equal_slices_of_its_latent_and_inverts(log: bool) -> None:
    transform, raw0 = make_transform(_hp(type="integer", low=1, high=10, log=log, init=4), **F64)
    assert isinstance(transform, Integer) and transform.discrete
    assert int(transform.value(raw0)) == 4 and transform.value(raw0).dtype == torch.int64
    for k in range(1, 11):
        raw = transform.raw_of_value(torch.tensor(k), torch.float64)
        assert int(transform.value(raw)) == k
        torch.testing.assert_close(transform.code(raw), raw.reshape(1))
    # the latent c = (low - 1/2) + (high - low + 1) sigmoid(r) puts equal lengths under each integer
    latent = transform.latent.forward(torch.linspace(-12, 12, 200001, dtype=torch.float64))
    values = transform.value(torch.linspace(-12, 12, 200001, dtype=torch.float64))
    assert set(values.tolist()) == set(range(1, 11))
    for k in (2, 5, 9):
        inside = latent[values == k]
        width = (torch.log(inside.max()) - torch.log(inside.min())) if log else (inside.max() - inside.min())
        expected = math.log((k + 0.5) / (k - 0.5)) if log else 1.0
        assert float(width) == pytest.approx(expected, abs=2e-3)


def test_categorical_values_codes_and_types() -> None:
    numbers, raw = make_transform(_hp(type="categorical", choices=[16, 32, 64], init=32), **F64)
    assert isinstance(numbers, Categorical)
    value = numbers.value(raw)
    assert value.dtype == torch.int64 and int(value) == 32
    torch.testing.assert_close(numbers.code(raw), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    flags, raw = make_transform(_hp(type="categorical", choices=[False, True]), **F64)
    assert flags.value(raw).dtype == torch.bool and bool(flags.value(raw)) is False
    words, raw = make_transform(_hp(type="categorical", choices=["none", "flip", "crop"], init="crop"), **F64)
    assert words.value(raw) == "crop"
    assert torch.softmax(raw, 0)[2] == torch.softmax(raw, 0).max()


# --- compiled levels, views and outputs -------------------------------------------------------
def _ridge_with_strength(strength: dict, **extra) -> dict:
    data = ridge_spec(per_feature=False, inner_steps=800).model_dump(mode="json")
    data["levels"]["upper"]["variables"] = {"strength": {"kind": "hyperparameter", **strength}}
    data["levels"]["upper"]["objective"] = f"{RIDGE}:upper"
    data["levels"]["lower"]["objective"] = f"{RIDGE}:lower"
    data.update(extra)
    return data


@pytest.mark.parametrize("config", [ImplicitConfig(), UnrolledConfig()], ids=["implicit", "unrolled"])
def test_hypergradient_flows_through_the_transform(config) -> None:
    """strength = exp(raw) (log, unbounded) is the ridge toy's exp(lam): dF/draw = dF/dlam exactly;
    bounded, the chain rule adds d value / d raw."""
    lam = -1.0
    exact = float(ridge_hypergrad(torch.tensor(lam, dtype=torch.float64), ridge_data(), ridge_val_data()))
    for strength, factor in [
        ({"log": True, "init": math.exp(lam)}, 1.0),
        ({"log": True, "low": 1e-3, "high": 10.0, "init": math.exp(lam)}, None),
    ]:
        problem = compile_spec(spec_from_data(_ridge_with_strength(strength)))
        x = problem.fresh(problem.upper.init)
        engine = build_engine(config)
        result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
        if factor is None:  # d lam / d raw of lam = a + (b - a) sigmoid(raw)
            u = torch.sigmoid(x[0])
            factor = float((math.log(10.0) - math.log(1e-3)) * u * (1 - u))
        assert float(result.grad[0]) == pytest.approx(exact * factor, rel=1e-6)


def test_result_json_and_monitor_hold_values_in_user_units(tmp_path: Path) -> None:
    data = _ridge_with_strength({"log": True, "low": 1e-3, "high": 10.0, "init": 0.5},
                                monitor="bilevel.trajectories:record_hyperparameters")
    data["run"].update(steps=4, monitor_every=2)
    outcome = run(spec_from_data(data), out=tmp_path, progress=False)
    written = json.loads((tmp_path / "result.json").read_text())
    raw = outcome.x[0]
    value = math.exp(math.log(1e-3) + (math.log(10.0) - math.log(1e-3)) * float(torch.sigmoid(raw)))
    assert written["upper_variables"]["strength"] == pytest.approx(value, rel=1e-12)
    assert abs(written["upper_variables"]["strength"] - float(raw)) > 0.1  # not the raw tensor
    monitored = [json.loads(line)["monitor"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                 if "monitor" in json.loads(line)]
    assert len(monitored) == 2 and monitored[-1]["strength"] == pytest.approx(value, rel=1e-12)
    # the small upper variables logged every step (at the point the step's loss was taken) are in
    # user units too: the first record holds the initial value, 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["upper"]["strength"] == pytest.approx(0.5, rel=1e-6)


def test_metrics_log_a_string_categorical_as_the_index_of_its_choice() -> None:
    from bilevel.runtime.records import TrackedUpper

    data = _ridge_with_strength({"log": True, "init": 0.5})
    data["levels"]["upper"]["variables"]["mode"] = {"kind": "hyperparameter", "type": "categorical",
                                                    "choices": ["ridge", "none"], "init": "none"}
    data["levels"]["lower"]["objective"] = f"{RIDGE}:categorical_lower"
    problem = compile_spec(spec_from_data(data))
    tracked = TrackedUpper(problem)
    values = torch.cat(tracked.read(problem.upper.init, torch.float64)).tolist()
    assert tracked.unflatten(values) == {"strength": pytest.approx(0.5), "mode": 1.0}


def test_tuned_optimizer_setting_reads_the_value(tmp_path: Path) -> None:
    """A tuned weight decay declared as a log-scale hyperparameter: the solver sees the value."""
    data = ridge_spec(per_feature=False, inner_steps=800).model_dump(mode="json")
    data["levels"]["lower"]["objective"] = "problems.toy:ridge_upper"  # the data fit only; decay from the solver
    data["levels"]["upper"]["variables"] = {"wd": {"kind": "hyperparameter", "log": True, "low": 1e-4, "high": 10.0, "init": math.exp(-1.0)}}
    data["levels"]["upper"]["objective"] = "problems.toy:ridge_upper"
    data["levels"]["lower"]["solver"]["tuned"] = {"weight_decay": "wd"}
    problem = compile_spec(spec_from_data(data))
    x = problem.fresh(problem.upper.init)
    assert float(problem.tuned_hyperparameters(x, {"weight_decay": "wd"})["weight_decay"]) == pytest.approx(math.exp(-1.0))
    engine = build_engine(ImplicitConfig())
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    u = torch.sigmoid(x[0])
    dvalue = float(math.exp(-1.0) * (math.log(10.0) - math.log(1e-4)) * u * (1 - u))
    expected = float(ridge_hypergrad(torch.tensor(-1.0, dtype=torch.float64), ridge_data(), ridge_val_data())) / math.exp(-1.0)
    assert float(result.grad[0]) == pytest.approx(expected * dvalue, rel=1e-6)


def test_categorical_value_reaches_the_objective_and_outputs() -> None:
    data = _ridge_with_strength({"log": True, "init": 0.5})
    data["levels"]["upper"]["variables"]["mode"] = {"kind": "hyperparameter", "type": "categorical", "choices": ["ridge", "none"]}
    data["levels"]["lower"]["objective"] = f"{RIDGE}:categorical_lower"
    data["run"]["steps"] = 2
    problem = compile_spec(spec_from_data(data))
    assert problem.upper.view(problem.upper.init)["mode"] == "ridge"  # the dry run evaluated it too
    from bilevel.runtime.loop import to_nested

    assert to_nested(problem.upper.values(problem.upper.init)) == {"strength": pytest.approx(0.5), "mode": "ridge"}


# --- the planner --------------------------------------------------------------------------------
def _discrete_spec(engine: dict | None = None) -> dict:
    data = _ridge_with_strength({"log": True, "init": 0.5})
    data["levels"]["upper"]["variables"]["units"] = {"kind": "hyperparameter", "type": "integer", "low": 1, "high": 8}
    if engine is not None:
        data["engine"] = engine
    return data


def test_discrete_hyperparameter_without_a_best_response_model_is_explained() -> None:
    loaded = spec_from_data(_discrete_spec())
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(loaded))
    assert "levels.lower.variables" in str(info.value) and "STN layers" in str(info.value)


@pytest.mark.parametrize("kind", ["implicit", "unrolled", "penalty", "bo_rep", "lv_hba"])
def test_engines_without_discrete_support_refuse_discrete_hyperparameters(kind: str) -> None:
    loaded = spec_from_data(_discrete_spec({"kind": kind}))
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(loaded))
    issue = info.value.issues[0]
    assert issue.path == "levels.upper.variables.units"
    assert f"the {kind} engine cannot take this hyperparameter (discrete)" in issue.message and "stn" in issue.message


def test_non_differentiable_hyperparameter_is_refused_by_hypergradient_engines() -> None:
    data = _ridge_with_strength({"log": True, "init": 0.5, "differentiable": False}, engine={"kind": "implicit"})
    loaded = spec_from_data(data)
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(loaded))
    assert "differentiable: false" in str(info.value) and "levels.upper.variables.strength" in str(info.value)


def test_stn_requested_for_a_lower_level_without_stn_layers_is_refused() -> None:
    loaded = spec_from_data(_ridge_with_strength({"log": True, "init": 0.5}, engine={"kind": "stn"}))
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(loaded))
    assert "levels.lower.variables" in str(info.value) and "best-response model" in str(info.value)


def test_planner_picks_stn_for_discrete_hyperparameters_with_its_reason() -> None:
    import sys

    sys.path.insert(0, str(HERE / "runtime_data"))
    import discrete_choice

    loaded = spec_from_data(discrete_choice.features_spec())
    plan = make_plan(compile_spec(loaded))
    assert plan.engine.kind == "stn" and isinstance(plan.engine, StnConfig)
    assert "levels.upper.variables.k (discrete)" in plan.reasons[0]
    assert plan.facts.discrete_hyperparameters == ("k",) and plan.facts.best_response_model


def test_hyperparameter_variables_belong_upstairs() -> None:
    data = _ridge_with_strength({"log": True, "init": 0.5})
    data["levels"]["lower"]["variables"]["rate"] = {"kind": "hyperparameter", "low": 0.0, "high": 1.0}
    with pytest.raises(SpecError) as info:
        compile_spec(spec_from_data(data))
    assert info.value.issues[0].path == "levels.lower.variables.rate"


def test_a_tuned_optimizer_setting_must_be_continuous() -> None:
    data = _discrete_spec()
    data["levels"]["lower"]["solver"]["tuned"] = {"lr": "units"}
    with pytest.raises(SpecError) as info:
        compile_spec(spec_from_data(data))
    assert "levels.lower.solver.tuned.lr" in str(info.value) and "discrete" in str(info.value)


# --- bad input through `bilevel validate` (exit 2, dotted path, no traceback) -------------------
GOOD = yaml.safe_load((HERE / "specs" / "good.yaml").read_text())

BAD = {
    "range low > high": ({"kind": "hyperparameter", "low": 0.9, "high": 0.1}, "lam.high", "low (0.9) is greater than high (0.1)"),
    "log with low <= 0": ({"kind": "hyperparameter", "low": 0.0, "high": 1.0, "log": True}, "lam.low", "needs low > 0"),
    "init outside the range": ({"kind": "hyperparameter", "low": 0.0, "high": 0.5, "init": 0.7}, "lam.init", "strictly inside"),
    "integer init outside": ({"kind": "hyperparameter", "type": "integer", "low": 1, "high": 4, "init": 9}, "lam.init", "outside the range"),
    "integer without a range": ({"kind": "hyperparameter", "type": "integer"}, "lam.low", "needs its range"),
    "half a range": ({"kind": "hyperparameter", "low": 0.1}, "lam.high", "both low and high"),
    "empty choices": ({"kind": "hyperparameter", "type": "categorical", "choices": []}, "lam.choices", "non-empty"),
    "missing choices": ({"kind": "hyperparameter", "type": "categorical"}, "lam.choices", "non-empty"),
    "init not a choice": ({"kind": "hyperparameter", "type": "categorical", "choices": ["a", "b"], "init": "c"}, "lam.init", "not one of the choices"),
    "mixed choices": ({"kind": "hyperparameter", "type": "categorical", "choices": [1, "a"]}, "lam.choices", "all numbers"),
    "duplicate choices": ({"kind": "hyperparameter", "type": "categorical", "choices": [1, 1]}, "lam.choices", "unique"),
    "choices on a continuous one": ({"kind": "hyperparameter", "low": 0, "high": 1, "choices": [1]}, "lam.choices", "categorical"),
    "shape on an integer": ({"kind": "hyperparameter", "type": "integer", "low": 1, "high": 3, "shape": [2]}, "lam.shape", "scalar"),
    "unknown type": ({"kind": "hyperparameter", "type": "ordinal"}, "lam.type", "continuous"),
}


def _validate(tmp_path: Path, data: dict, *extra: str) -> tuple[int, str]:
    (tmp_path / "user_objectives.py").write_text((HERE / "specs" / "user_objectives.py").read_text())
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["validate", str(spec), *extra])
    return result.exit_code, result.output


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_hyperparameter_declarations_exit_2_with_the_dotted_path(case: str, tmp_path: Path) -> None:
    variable, where, message = BAD[case]
    data = copy.deepcopy(GOOD)
    data["levels"]["upper"]["variables"]["lam"] = variable
    code, output = _validate(tmp_path, data)
    assert code == 2 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert any(f"levels.upper.variables.{where}" in line and message in line and "spec.yaml" in line for line in lines), output


def test_discrete_hyperparameter_given_to_an_engine_that_cannot_take_it_exits_2(tmp_path: Path) -> None:
    data = copy.deepcopy(GOOD)
    data["levels"]["upper"]["variables"]["units"] = {"kind": "hyperparameter", "type": "integer", "low": 1, "high": 4}
    code, output = _validate(tmp_path, data, "--set", "engine.kind=implicit")
    assert code == 2 and "Traceback" not in output
    assert "levels.upper.variables.units" in output and "cannot take this hyperparameter (discrete)" in output
    assert "engines that can: stn" in output


@pytest.mark.parametrize("engine", ["stn", "auto"])
def test_stn_refuses_a_tuned_step_size_exit_2_with_the_dotted_path(engine: str, tmp_path: Path) -> None:
    """STN fits its response to the training objective, which an optimizer's lr does not enter: the
    response could not learn its effect. A tuned weight decay is a term of that objective and is
    accepted (tests/test_stn.py)."""
    import sys

    sys.path.insert(0, str(HERE / "runtime_data"))
    import stn_ridge

    data = stn_ridge.spec()
    data["engine"] = {"kind": engine}
    data["levels"]["upper"]["variables"]["wd"]["differentiable"] = False  # auto: the planner picks stn
    data["levels"]["upper"]["variables"]["step"] = {"kind": "hyperparameter", "log": True, "low": 1e-3, "high": 1.0, "init": 0.05}
    data["levels"]["lower"]["variables"]["w"]["kwargs"]["n_hyper"] = 2
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    assert runner.invoke(app, ["validate", str(spec)]).exit_code == 0  # weight decay alone: accepted
    data["levels"]["lower"]["solver"]["tuned"]["lr"] = "step"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if "levels.lower.solver.tuned.lr" in line]
    assert "spec.yaml" in line and "stn engine" in line and "unrolled" in line


def test_good_hyperparameter_spec_validates(tmp_path: Path) -> None:
    data = copy.deepcopy(GOOD)
    data["levels"]["upper"]["variables"]["lam"] = {"kind": "hyperparameter", "low": -3.0, "high": 3.0, "init": "1e-3"}
    code, output = _validate(tmp_path, data)
    assert code == 0, output


def test_constraints_and_a_discrete_hyperparameter_together_are_refused_not_mishandled() -> None:
    """The constraint rule comes first and picks LV-HBA, which cannot take the discrete one."""
    data = _discrete_spec()
    data["levels"]["lower"]["constraints"] = [{"fn": f"{RIDGE}:norm_budget"}]
    loaded = spec_from_data(data)
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(loaded))
    assert info.value.issues[0].path == "levels.upper.variables.units" and "lv_hba" in str(info.value)
