"""Conformance: every registered engine on the closed-form problems, what is checked derived from
its declared capabilities (``bilevel.engines.Capabilities``):

* hypergradient engines (``returns_hypergradient``): one hypergradient equals the closed form to
  < 1e-4 relative error on the quadratic and on ridge (float64, converged inner solve), and a run
  reaches x* of the quadratic;
* single-loop engines (penalty, BO-REP, LV-HBA), whose per-step direction is not the
  hypergradient: running them on the strongly convex quadratic reaches the same upper solution
  as the implicit engine, within the tolerance documented per engine (docs/engines/);
* architecture engines (``handles_architecture``: darts, rarts), which alternate single weight and
  upper steps: each comes to rest at its own closed-form fixed point (docs/engines/darts.md);
* best-response engines (``needs_best_response``: STN): the quadratic with y an STN tensor
  (problems/toy/stn.py), whose affine response is exact, reaches the same x*;
* depth (``max_depth``): engines for any depth match the three-level closed form to 1e-6; the
  others are refused on three levels;
* instances (``handles_instances``): a batch of independent instances gives each instance the
  hypergradient it gets alone (1e-10); the others are refused on a batch;
* the fast path on CPU (``graph_safe``): the hypergradient checks again with every call replayed
  from a captured graph (the replay backend keeps a CUDA graph's contract); slow: compiled;
* proximal terms (``handles_prox_operators``): the lasso and elastic-net hypergradients equal their closed
  forms on the active set (problems/sparse_hpo) to 1e-8; the others are refused on such a level;
* a level of blocks (problems/toy/blocks.py): with every block drawn, the hypergradient engines that
  handle instances match the closed form to 1e-10; engines that sample blocks (``samples_blocks``)
  reach the full-batch solution x* (their documented tolerance); the others are refused on
  sampled blocks.

A newly registered engine fails ``test_every_engine_has_settings_for_what_it_declares`` until it
is given settings here for each check its capabilities call for."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from bilevel import run
from bilevel.compile import compile_spec
from bilevel.engines import (
    BORepConfig,
    BSVRBConfig,
    DartsConfig,
    ForwardConfig,
    ImplicitConfig,
    LinearSolverSpec,
    LVHBAConfig,
    PenaltyConfig,
    QPConfig,
    RartsConfig,
    StnConfig,
    UnrolledConfig,
    ZeroOrderConfig,
    build_engine,
    engine_capabilities,
    engine_kinds,
)
from bilevel.planner import make_plan
from bilevel.spec import SpecError, spec_from_data
from helpers import hypergrad_calls, replayed
from oracles import (
    darts_fixed_point_on_the_quadratic,
    lasso_closed_form,
    quadratic_data,
    quadratic_hypergrad,
    quadratic_solution,
    rarts_fixed_point,
    rel_error,
    ridge_data,
    ridge_hypergrad,
    ridge_val_data,
    three_level_closed_form,
)
from problems.toy import quadratic_spec, ridge_spec
from problems.toy.stn import quadratic_stn_spec
from problems.toy.three_level import three_level_spec


# --- what each engine is checked with ---------------------------------------------------------------
def _run_darts_on_the_quadratic(config: Any, tmp_path: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = quadratic_spec(inner_steps=1, steps=1000, checkpoint_every=None).model_dump(mode="json")
    data["levels"]["upper"]["solver"] = {"name": "sgd", "lr": 0.5}
    result = run(spec_from_data(data), engine=config, out=tmp_path, progress=False)
    return result.x[0], darts_fixed_point_on_the_quadratic(config.order)


def _run_rarts_on_the_analytic_toy(config: Any, tmp_path: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # RARTS minimizes lam G jointly in x as well: on the quadratic, whose G is linear in x, that is unbounded;
    # the DARTS toy's relaxed objective is convex with a closed-form stationary point
    from problems.nas.toy import toy_spec

    result = run(toy_spec(steps=3000, inner_lr=0.02, outer_lr=0.02), engine=config, out=tmp_path, progress=False)
    return result.x[0].reshape(1), torch.tensor([rarts_fixed_point(config.lam, config.beta)[0]], dtype=torch.float64)


@dataclass
class Settings:
    """An engine's configurations for each check (which ones it needs follows from its capabilities)."""

    hypergradient: list[Any] = field(default_factory=list)
    """Configs whose one hypergradient must match the closed forms."""
    solution: tuple[Any, dict[str, Any], int, float] | None = None
    """(config, outer optimizer, outer steps, relative tolerance on x*) for a run on the quadratic."""
    inner_steps: int = 30
    """Warm-started inner steps per outer step of that run. Engines that differentiate only the
    current solve from its warm start (unrolled, zero_order) need T = 100 to make the neglected
    dependence of the start on x negligible; online forward mode (RTHO) carries it in its tangents."""
    fixed_point: list[tuple[Any, Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
    best_response: tuple[Any, int, float] | None = None
    """(config, outer steps, relative tolerance on x*) on the quadratic with an STN tensor."""
    chain: list[Any] = field(default_factory=list)
    """Configs matched against the three-level closed form."""
    instances: Any = None
    """A config for the batch-of-instances check."""
    prox: list[Any] = field(default_factory=list)
    """Configs matched against the lasso / elastic-net closed forms (a lower level with a prox)."""
    own_solver: bool = False
    """The engine solves the lower level itself, not with the spec's inner solver: its stats count
    its own iterations."""
    blocks: tuple[Any, int, float, float, float] | None = None
    """(config, outer steps, upper lr, lower lr, relative tolerance on x*) for a run on the
    quadratic blocks with every block drawn (engines that sample blocks)."""


SETTINGS: dict[str, Settings] = {
    "implicit": Settings(
        hypergradient=[
            ImplicitConfig(),
            ImplicitConfig(linear_solver=LinearSolverSpec(method="direct")),
            ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=600, neumann_lr=0.09)),
            ImplicitConfig(hvp="forward"),
        ],
        solution=(ImplicitConfig(), {"name": "sgd", "lr": 0.2}, 300, 1e-6),
        chain=[ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=4)),
               ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=60))],
        instances=ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=6)),
        prox=[ImplicitConfig(), ImplicitConfig(linear_solver=LinearSolverSpec(method="direct")),
              ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=300))],
    ),
    "unrolled": Settings(
        hypergradient=[UnrolledConfig(), UnrolledConfig(checkpoint_every=7), UnrolledConfig(truncate=400, checkpoint_every=50)],
        solution=(UnrolledConfig(), {"name": "sgd", "lr": 0.2}, 300, 1e-6),
        inner_steps=100,
        chain=[UnrolledConfig()],
        instances=UnrolledConfig(checkpoint_every=4, truncate=10),
        prox=[UnrolledConfig(), UnrolledConfig(checkpoint_every=100)],
    ),
    "penalty": Settings(solution=(PenaltyConfig(gamma_max=30.0, lower_lr=0.09, omega_lr=0.09), {"name": "sgd", "lr": 1.0}, 2000, 5e-3)),
    "bo_rep": Settings(solution=(
        BORepConfig(z_lr=0.09, lower_steps=10, update_every=2),
        {"name": "normalized_momentum", "lr": 0.05, "momentum": 0.9, "schedule": "cosine"}, 2000, 1e-3)),
    "lv_hba": Settings(solution=(LVHBAConfig(lower_lr=0.05, eta=0.05, gamma1=10.0, c0=1.0, p=0.3), {"name": "sgd", "lr": 0.05}, 6000, 1e-2)),
    "darts": Settings(fixed_point=[(DartsConfig(order=1), _run_darts_on_the_quadratic),
                                   (DartsConfig(order=2), _run_darts_on_the_quadratic),
                                   (DartsConfig(order=2, hessian="exact"), _run_darts_on_the_quadratic)]),
    "rarts": Settings(fixed_point=[(RartsConfig(lam=10.0, beta=10.0), _run_rarts_on_the_analytic_toy)]),
    "stn": Settings(best_response=(StnConfig(), 2000, 1e-2)),
    "forward": Settings(
        hypergradient=[ForwardConfig(), ForwardConfig(online=True)],
        solution=(ForwardConfig(online=True), {"name": "sgd", "lr": 0.2}, 300, 1e-6),
        inner_steps=3,
    ),
    # orthogonal antithetic directions, N a multiple of d: exact on the quadratic (F(x, y_T(x)) is
    # quadratic in x), O(sigma^2) on ridge; the run takes 100 outer steps (its cost: 7 lower solves each)
    # the QP engine solves the lower QP itself (an interior-point method: one Newton solve without
    # constraints), whatever the inner solver's steps
    "qp": Settings(hypergradient=[QPConfig()], solution=(QPConfig(), {"name": "sgd", "lr": 0.2}, 300, 1e-6),
                   instances=QPConfig(), own_solver=True),
    "bsvrb": Settings(blocks=(BSVRBConfig(), 500, 0.1, 0.3, 1e-8)),
    "zero_order": Settings(
        hypergradient=[ZeroOrderConfig(distribution="orthogonal", samples=30, sigma=1e-4)],
        solution=(ZeroOrderConfig(distribution="orthogonal", samples=3, sigma=1e-3), {"name": "sgd", "lr": 0.2}, 100, 2e-3),
        inner_steps=100,
    ),
}


def _required(kind: str) -> list[str]:
    """The settings an engine's capabilities call for."""
    caps = engine_capabilities()[kind]
    needed = []
    if caps.returns_hypergradient:
        needed += ["hypergradient", "solution"]
    elif caps.handles_architecture:
        needed.append("fixed_point")
    elif caps.needs_best_response:
        needed.append("best_response")
    elif caps.samples_blocks:
        needed.append("blocks")
    else:
        needed.append("solution")
    if caps.solves_depth(3):
        needed.append("chain")
    if caps.handles_instances:
        needed.append("instances")
    if caps.handles_prox_operators:
        needed.append("prox")
    return needed


def _with_capability(predicate: Callable[[Any], bool]) -> list[str]:
    return [kind for kind, caps in engine_capabilities().items() if predicate(caps)]


def test_every_engine_has_settings_for_what_it_declares() -> None:
    for kind in engine_kinds():
        assert kind in SETTINGS, f"add the engine {kind!r} to the conformance suite"
        missing = [name for name in _required(kind) if not getattr(SETTINGS[kind], name)]
        assert not missing, f"engine {kind!r} declares capabilities that need conformance settings: {missing}"


def _cases(attribute: str, fast: bool = False, head: int | None = None) -> list[Any]:
    """(kind, config, mode) for every config of ``attribute``; with ``fast``, the graph-safe
    engines' configs again through the replayed fast path."""
    out = []
    for kind in engine_kinds():
        configs = getattr(SETTINGS.get(kind, Settings()), attribute)
        if isinstance(configs, tuple):  # (config, settings...): its config
            configs = configs[0]
        configs = configs if isinstance(configs, list) else ([] if configs is None else [configs])
        for config in configs[:head]:
            out.append(pytest.param(config, "eager", id=f"{kind}-{config!r}"))
            if fast and engine_capabilities()[kind].graph_safe:
                out.append(pytest.param(config.model_copy(update={"fast_path": "cuda_graph"}), "replay", id=f"{kind}-replay-{config!r}"))
    return out


@contextmanager
def _mode(mode: str) -> Iterator[None]:
    if mode == "replay":
        with replayed():
            yield
    else:
        yield


# --- hypergradient engines ----------------------------------------------------------------------
@pytest.mark.parametrize("config, mode", _cases("hypergradient", fast=True))
def test_quadratic_hypergradient_matches_closed_form(config: Any, mode: str) -> None:
    problem = compile_spec(quadratic_spec(inner_steps=400))
    with _mode(mode):
        x = problem.fresh(problem.upper.init)
        engine = build_engine(config)
        result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    assert rel_error(result.grad[0], quadratic_hypergrad(x[0], quadratic_data())) < 1e-4
    assert float(result.stats.inner_residual) < 1e-8
    assert result.stats.inner_steps == 400 or SETTINGS[config.kind].own_solver
    assert (result.stats.hvp_count > 0) == engine_capabilities()[config.kind].needs_hvp
    assert result.is_hypergradient


@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("config, mode", _cases("hypergradient", fast=True, head=2))
def test_ridge_hypergradient_matches_closed_form(config: Any, mode: str, per_feature: bool) -> None:
    problem = compile_spec(ridge_spec(per_feature=per_feature))
    with _mode(mode):
        x = problem.fresh(problem.upper.init)
        engine = build_engine(config)
        result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    reference = ridge_hypergrad(x[0], ridge_data(), ridge_val_data())
    assert result.grad[0].shape == reference.shape
    assert rel_error(result.grad[0], reference) < 1e-4


# --- every engine that solves the quadratic ------------------------------------------------------------
@pytest.mark.parametrize("config, mode", _cases("solution", fast=True))
def test_engine_reaches_the_implicit_solution_on_the_quadratic(config: Any, mode: str, tmp_path: Any) -> None:
    kind = config.kind
    _, outer, steps, tolerance = SETTINGS[kind].solution
    data = quadratic_spec(inner_steps=SETTINGS[kind].inner_steps, steps=steps, checkpoint_every=None).model_dump(mode="json")
    data["levels"]["upper"]["solver"] = outer
    data["levels"]["lower"]["solver"]["warm_start"] = True
    with _mode(mode):
        result = run(spec_from_data(data), engine=config, out=tmp_path, progress=False)
    assert rel_error(result.x[0], quadratic_solution()) < tolerance


@pytest.mark.parametrize("config, mode", _cases("solution", fast=True))
def test_stats_have_the_same_fields_for_every_engine(config: Any, mode: str) -> None:
    problem = compile_spec(quadratic_spec(inner_steps=20))
    with _mode(mode):
        x = problem.fresh(problem.upper.init)
        engine = build_engine(config)
        result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    fields = result.stats.as_floats()
    assert set(fields) - set(result.stats.extra) == {"inner_residual", "linear_residual", "hvp_count", "inner_steps", "time_s"}
    assert fields["inner_residual"] >= 0 and fields["time_s"] >= 0
    caps = engine_capabilities()[config.kind]
    if not caps.needs_hvp:
        assert fields["hvp_count"] == 0
    assert result.is_hypergradient == caps.returns_hypergradient  # what the direction is, said by the result


@pytest.mark.parametrize("mode", ["eager", "replay"])
def test_minibatched_lower_data_runs(mode: str) -> None:
    """Minibatches (which the fast path leaves eager, saying so once) give finite hypergradients."""
    data = ridge_spec(inner_steps=50).model_dump(mode="json")
    data["levels"]["lower"]["data"]["batch_size"] = 8
    problem = compile_spec(spec_from_data(data))
    fast = {"fast_path": "cuda_graph"} if mode == "replay" else {}
    with _mode(mode):
        x = problem.fresh(problem.upper.init)
        for config in (ImplicitConfig(**fast), UnrolledConfig(checkpoint_every=10, **fast)):
            engine = build_engine(config)
            result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
            assert torch.isfinite(result.grad[0]).all()


# --- alternating and best-response engines --------------------------------------------------------------
@pytest.mark.parametrize("case", [c for k in engine_kinds() for c in SETTINGS.get(k, Settings()).fixed_point],
                         ids=lambda c: repr(c[0]))
def test_alternating_engine_reaches_its_closed_form_fixed_point(case: Any, tmp_path: Any) -> None:
    config, runner = case
    reached, expected = runner(config, tmp_path)
    assert float((reached - expected).norm()) <= 1e-8 * max(1.0, float(expected.norm()))


@pytest.mark.parametrize("kind", [k for k in engine_kinds() if SETTINGS.get(k, Settings()).best_response])
def test_best_response_engine_reaches_the_implicit_solution_on_the_quadratic(kind: str, tmp_path: Any) -> None:
    config, steps, tolerance = SETTINGS[kind].best_response
    spec = quadratic_stn_spec(steps=steps, checkpoint_every=None, log_every=100)
    result = run(spec, engine=config, out=tmp_path, progress=False)
    assert rel_error(result.x[0], quadratic_solution()) < tolerance
    fields = json.loads((tmp_path / "result.json").read_text())["last_stats"]
    assert {"inner_residual", "linear_residual", "hvp_count", "inner_steps", "time_s"} <= set(fields)


# --- depth ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, mode", _cases("chain"))
def test_three_level_hypergradient_matches_the_closed_form(config: Any, mode: str) -> None:
    problem = compile_spec(three_level_spec())  # 40 cold-started steps per lower level: converged
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init)
    out = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.data.full)
    exact = three_level_closed_form(x[0])
    assert rel_error(out.grad[0], exact["hypergrad"]) < 1e-6
    b, c = problem.split(out.state.lower)
    assert rel_error(b[0], exact["b"]) < 1e-9 and rel_error(c[0], exact["c"]) < 1e-9
    assert set(out.stats.extra) == {"inner_residual.middle", "inner_residual.bottom"}
    below = engine.lower_solution(problem, x, engine.init(problem, x))  # the final evaluation's lower solution
    assert rel_error(problem.split(below)[1][0], exact["c"]) < 1e-9


@pytest.mark.parametrize("kind", _with_capability(lambda c: not c.solves_depth(3)))
def test_two_level_engines_are_refused_on_three_levels(kind: str) -> None:
    data = {**three_level_spec().model_dump(mode="json"), "engine": {"kind": kind}}
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert info.value.issues[0].path == "engine.kind" and "engines for more than two levels" in info.value.issues[0].message


# --- a batch of instances ---------------------------------------------------------------------------
def _instances_spec(config: Any) -> dict[str, Any]:
    data = quadratic_spec(inner_steps=60).model_dump(mode="json")
    data["levels"]["upper"]["variables"]["x"]["init"] = 0.0
    data["instances"] = {"count": 3, "vary": {"levels.upper.variables.x.init": [0.3, -0.2, 0.7],
                                              "levels.upper.objective_kwargs.rho": [0.1, 0.2, 0.05]}}
    data["engine"] = config.model_dump(mode="json")
    return data


@pytest.mark.parametrize("config, mode", _cases("instances", fast=True))
def test_each_instance_of_a_batch_gets_its_own_hypergradient(config: Any, mode: str) -> None:
    from bilevel.compile.instances import instance_specs

    loaded = spec_from_data(_instances_spec(config))
    batched = compile_spec(loaded)
    with _mode(mode):
        got = hypergrad_calls(build_engine(config), batched, 2)
    for k, single in enumerate(compile_spec(one) for one in instance_specs(loaded)):
        want = hypergrad_calls(build_engine(config.model_copy(update={"fast_path": "off"})), single, 2)
        for a, b in zip(got, want):
            assert rel_error(a.grad[0][k], b.grad[0]) < 1e-10


@pytest.mark.parametrize("kind", _with_capability(lambda c: not c.handles_instances))
def test_engines_that_couple_instances_are_refused_on_a_batch(kind: str) -> None:
    data = _instances_spec(ImplicitConfig())
    data["engine"] = {"kind": kind}
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert any(issue.path == "instances" and "does not support a batch" in issue.message for issue in info.value.issues)


# --- proximal terms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [None, 0.05], ids=["lasso", "elastic_net"])
@pytest.mark.parametrize("config, mode", _cases("prox", fast=True, head=2))
def test_prox_hypergradient_matches_the_closed_form_on_the_active_set(config: Any, mode: str, l2: float | None) -> None:
    from problems.sparse_hpo import sparse_hpo_spec

    problem = compile_spec(sparse_hpo_spec(l2=l2))
    with _mode(mode):
        x = problem.fresh(problem.upper.init)
        engine = build_engine(config)
        result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    exact = lasso_closed_form(0.1, l2 or 0.0)
    assert 0 < int(exact.active.sum()) < exact.w.numel() and exact.margin > 0  # sparse, strictly complementary
    assert torch.equal(result.state.lower[0] != 0, exact.active)
    want = [exact.d_l1] if l2 is None else [exact.d_l1, exact.d_l2]
    for got, ref in zip(result.grad, want):
        assert abs(float(got) - float(ref)) < 1e-8 * abs(float(ref))
    assert float(result.stats.inner_residual) < 1e-8


@pytest.mark.parametrize("kind", _with_capability(lambda c: not c.handles_prox_operators))
def test_engines_without_prox_are_refused_on_a_prox_level(kind: str) -> None:
    from problems.sparse_hpo import sparse_hpo_spec

    data = {**sparse_hpo_spec().model_dump(mode="json"), "engine": {"kind": kind}}
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert any(issue.path == "levels.lower.variables.w.prox" and "does not differentiate proximal terms" in issue.message
               for issue in info.value.issues), info.value.issues


# --- a level of blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize("config, mode", [c for c in _cases("hypergradient") if engine_capabilities()[c.values[0].kind].handles_instances])
def test_every_block_drawn_matches_the_blocks_closed_form(config: Any, mode: str) -> None:
    from problems.toy.blocks import blocks_closed_form, blocks_spec

    problem = compile_spec(spec_from_data(blocks_spec(count=4, inner_steps=200)))
    try:
        make_plan(problem, config)
    except SpecError as error:  # a configuration refused on a batch (the direct solve)
        assert "batch of instances" in str(error)
        pytest.skip("refused on a batch")
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    assert rel_error(result.grad[0], blocks_closed_form(x[0], 4)["hypergrad"]) < 1e-10


@pytest.mark.parametrize("kind", [k for k in engine_kinds() if SETTINGS.get(k, Settings()).blocks])
def test_block_sampling_engine_reaches_the_full_batch_solution(kind: str, tmp_path: Any) -> None:
    from problems.toy.blocks import blocks_closed_form, blocks_spec

    config, steps, lr, lower_lr, tolerance = SETTINGS[kind].blocks
    data = blocks_spec(count=6, engine=config.model_dump(mode="json"), steps=steps, lr=lr, lower_lr=lower_lr)
    result = run(spec_from_data(data), out=tmp_path, progress=False)
    assert rel_error(result.x[0], blocks_closed_form(result.x[0], 6)["x_star"]) < tolerance


@pytest.mark.parametrize("kind", _with_capability(lambda c: not c.samples_blocks))
def test_engines_that_do_not_sample_blocks_are_refused_on_sampled_blocks(kind: str) -> None:
    from problems.toy.blocks import blocks_spec

    data = blocks_spec(count=6, sample=2, engine={"kind": kind})
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert any(issue.path == "levels.block.blocks.sample" for issue in info.value.issues), info.value.issues


# --- the fast path, compiled (slow) ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config, mode", _cases("hypergradient"))
def test_quadratic_hypergradient_matches_closed_form_compiled(config: Any, mode: str) -> None:
    if not engine_capabilities()[config.kind].graph_safe:
        pytest.skip("not run through the fast path")
    with replayed():
        test_quadratic_hypergradient_matches_closed_form(config.model_copy(update={"fast_path": "compile"}), "eager")


@pytest.mark.slow
@pytest.mark.parametrize("config, mode", _cases("solution"))
def test_engine_reaches_the_implicit_solution_compiled(config: Any, mode: str, tmp_path: Any) -> None:
    if not engine_capabilities()[config.kind].graph_safe:
        pytest.skip("not run through the fast path")
    with replayed():
        test_engine_reaches_the_implicit_solution_on_the_quadratic(config.model_copy(update={"fast_path": "compile"}), "eager", tmp_path)
