"""Planner rules: declared facts and the budget choose the engine, with reasons."""

from __future__ import annotations

import pytest

from bilevel.compile import compile_spec
from bilevel.planner import make_plan
from bilevel.engines import BORepConfig, ImplicitConfig, LVHBAConfig, PenaltyConfig, UnrolledConfig
from bilevel.spec import SpecError, spec_from_data
from problems.toy import quadratic_spec


def _plan(n: int = 8, convexity: str = "strongly_convex", memory_mb: float | None = None, engine=None, steps: int = 100, **extra):
    data = quadratic_spec(n=n, inner_steps=steps).model_dump(mode="json")
    data["levels"]["lower"]["assumptions"]["convexity"] = convexity
    data["run"]["budget"] = {"memory_mb": memory_mb}
    for key, value in extra.items():
        data["levels"]["lower"][key] = value
    loaded = spec_from_data(data)
    return make_plan(compile_spec(loaded), engine)


def test_strongly_convex_small_lower_level_gets_a_direct_solve() -> None:
    plan = _plan(n=8)
    assert isinstance(plan.engine, ImplicitConfig) and plan.engine.linear_solver.method == "direct"
    assert any("strongly_convex" in r for r in plan.reasons) and any("8 scalars" in r for r in plan.reasons)


def test_strongly_convex_larger_lower_level_gets_cg() -> None:
    plan = _plan(n=50)
    assert isinstance(plan.engine, ImplicitConfig) and plan.engine.linear_solver.method == "cg"
    assert any("conjugate gradient" in r for r in plan.reasons)


@pytest.mark.parametrize("convexity", ["convex", "unknown"])
def test_without_strong_convexity_the_planner_unrolls(convexity: str) -> None:
    plan = _plan(convexity=convexity)
    assert isinstance(plan.engine, UnrolledConfig)
    assert plan.engine.checkpoint_every is None and plan.engine.truncate is None
    assert any(convexity in r for r in plan.reasons)


def test_nonconvex_lower_level_gets_the_first_order_penalty_engine() -> None:
    plan = _plan(convexity="nonconvex")
    assert isinstance(plan.engine, PenaltyConfig)
    assert any("non-unique" in r for r in plan.reasons)
    assert not plan.warnings  # the toy's upper solver is sgd, as V-PBGD is defined


def test_unbounded_upper_smoothness_gets_bo_rep_with_advice_on_the_outer_optimizer() -> None:
    data = quadratic_spec().model_dump(mode="json")
    data["levels"]["upper"]["assumptions"] = {"smoothness": "unbounded"}
    loaded = spec_from_data(data)
    plan = make_plan(compile_spec(loaded))
    assert isinstance(plan.engine, BORepConfig)
    assert any("unbounded" in r for r in plan.reasons)
    assert any("normalized_momentum" in w for w in plan.warnings)
    data["levels"]["upper"]["solver"] = {"name": "normalized_momentum", "lr": 0.05}
    loaded = spec_from_data(data)
    assert not make_plan(compile_spec(loaded)).warnings


def test_memory_budget_turns_on_checkpointing_then_truncation() -> None:
    facts = _plan(convexity="unknown", steps=400).facts
    full = facts.unrolled_memory_mb(400)
    checkpointed = _plan(convexity="unknown", steps=400, memory_mb=full / 4)
    assert checkpointed.engine.checkpoint_every == 20 and checkpointed.engine.truncate is None
    assert any("checkpointing every 20" in r for r in checkpointed.reasons)
    truncated = _plan(convexity="unknown", steps=400, memory_mb=facts.unrolled_memory_mb(10))
    assert truncated.engine.truncate is not None and truncated.engine.truncate <= 10
    assert any("truncated" in r for r in truncated.reasons)


def test_explicit_engine_overrides_with_a_warning_on_contradiction() -> None:
    plan = _plan(convexity="nonconvex", engine=ImplicitConfig())
    assert isinstance(plan.engine, ImplicitConfig)
    assert plan.warnings and "nonconvex" in plan.warnings[0]
    quiet = _plan(convexity="strongly_convex", engine=UnrolledConfig())
    assert isinstance(quiet.engine, UnrolledConfig) and not quiet.warnings


def test_declared_constraints_pick_lv_hba_and_refuse_engines_without_constraint_support() -> None:
    loaded = spec_from_data(_constrained_toy_data())
    plan = make_plan(compile_spec(loaded))
    assert isinstance(plan.engine, LVHBAConfig)
    assert any("coupling both levels" in r for r in plan.reasons)
    for engine in (ImplicitConfig(), UnrolledConfig(), PenaltyConfig(), BORepConfig()):
        with pytest.raises(SpecError) as explicit:
            make_plan(compile_spec(loaded), engine)
        assert explicit.value.issues[0].path == "levels.lower.constraints"
        assert "cannot handle lower-level constraints" in explicit.value.issues[0].message


def _constrained_toy_data() -> dict:
    import yaml

    from bilevel.presets import find_preset

    data = yaml.safe_load(find_preset("constrained_toy/lv_hba").read_text())
    data["engine"] = {"kind": "auto"}
    return data


def test_plan_json_is_serializable() -> None:
    import json

    payload = _plan().to_json()
    assert json.loads(json.dumps(payload))["engine"] == "implicit"
    assert payload["facts"]["n_lower"] == 8
