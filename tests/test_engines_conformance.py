"""Conformance: every registered engine on the closed-form problems.

Two checks per engine, whichever its kind supports:
* hypergradient engines (implicit, unrolled): one hypergradient equals the closed form to < 1e-4
  relative error (float64, converged inner solve);
* single-loop engines (penalty, BO-REP, LV-HBA), whose per-step direction is not the hypergradient:
  running them on the strongly convex quadratic reaches the same upper solution as the implicit
  engine, within the tolerance documented per engine (docs/engines/);
* the DARTS family (darts, rarts), which alternate single weight and upper steps: each comes to rest
  at its own closed-form fixed point (docs/engines/darts.md).
* best-response engines (STN), which need a lower model that takes the hyperparameters as input:
  the same quadratic with y an STN tensor (problems/toy/stn.py), whose affine response is exact,
  reaches the same x* within the documented tolerance.
A newly registered engine fails the suite until it is given an entry here."""

from __future__ import annotations

import json

import pytest
import torch

from bilevel import run
from bilevel.compile import compile_spec
from bilevel.engines import build_engine, engine_kinds
from bilevel.spec import (
    BORepConfig,
    DartsConfig,
    ImplicitConfig,
    LinearSolverSpec,
    LVHBAConfig,
    PenaltyConfig,
    RartsConfig,
    StnConfig,
    UnrolledConfig,
    spec_from_data,
)
from problems.toy import (
    quadratic_data,
    quadratic_hypergrad,
    quadratic_spec,
    ridge_data,
    ridge_hypergrad,
    ridge_spec,
    ridge_val_data,
)
from problems.toy.stn import quadratic_stn_spec

HYPERGRADIENT_CONFIGS = {
    "implicit": [
        ImplicitConfig(),
        ImplicitConfig(linear_solver=LinearSolverSpec(method="direct")),
        ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=600, neumann_lr=0.09)),
        ImplicitConfig(hvp="forward"),
    ],
    "unrolled": [UnrolledConfig(), UnrolledConfig(checkpoint_every=7), UnrolledConfig(truncate=400, checkpoint_every=50)],
}

# single-loop engines: (config, upper optimizer, outer steps, relative tolerance on x*)
SOLUTION_CONFIGS = {
    "penalty": (PenaltyConfig(gamma_max=30.0, lower_lr=0.09, omega_lr=0.09), {"name": "sgd", "lr": 1.0}, 2000, 5e-3),
    "bo_rep": (
        BORepConfig(z_lr=0.09, lower_steps=10, update_every=2),
        {"name": "normalized_momentum", "lr": 0.05, "momentum": 0.9, "schedule": "cosine"},
        2000,
        1e-3,
    ),
    "lv_hba": (
        LVHBAConfig(lower_lr=0.05, eta=0.05, gamma1=10.0, c0=1.0, p=0.3),
        {"name": "sgd", "lr": 0.05},
        6000,
        1e-2,
    ),
    # hypergradient engines also solve the problem (checked against the closed form above)
    "implicit": (ImplicitConfig(), {"name": "sgd", "lr": 0.2}, 300, 1e-6),
    "unrolled": (UnrolledConfig(), {"name": "sgd", "lr": 0.2}, 300, 1e-6),
}


# best-response engines: (config, outer steps, relative tolerance on x*) on the quadratic with an STN tensor
BEST_RESPONSE_CONFIGS = {
    "stn": (StnConfig(), 2000, 1e-2),
}


def test_every_registered_engine_is_covered() -> None:
    covered = set(SOLUTION_CONFIGS) | set(FIXED_POINT_CONFIGS) | set(BEST_RESPONSE_CONFIGS)
    assert set(engine_kinds()) <= covered, "add the new engine to the conformance suite"
    assert set(HYPERGRADIENT_CONFIGS) <= set(engine_kinds())


# --- the DARTS family: single weight and upper steps, each with its own closed-form fixed point -----------
def _darts_fixed_point(order: int, xi: float = 0.09, rho: float = 0.1) -> torch.Tensor:
    """First order: grad_x F(x, y*(x)) = rho x = 0. Second order (sgd virtual step xi): rho x + xi B^T (y*(x) - c) = 0,
    i.e. A^{-1} of the implicit solution replaced by xi I."""
    data = quadratic_data()
    B, c = data["B"], data["c"]
    if order == 1:
        return torch.zeros(B.shape[1], dtype=B.dtype)
    M = rho * torch.eye(B.shape[1], dtype=B.dtype) + xi * B.T @ torch.linalg.solve(data["A"], B)
    return torch.linalg.solve(M, xi * B.T @ c)


def _run_darts_on_the_quadratic(config, tmp_path) -> tuple[torch.Tensor, torch.Tensor]:
    data = quadratic_spec(inner_steps=1, steps=1000, checkpoint_every=None).model_dump(mode="json")
    data["levels"]["upper"]["solver"] = {"name": "sgd", "lr": 0.5}
    result = run(spec_from_data(data), engine=config, out=tmp_path, progress=False)
    return result.x[0], _darts_fixed_point(config.order)


def _run_rarts_on_the_analytic_toy(config, tmp_path) -> tuple[torch.Tensor, torch.Tensor]:
    # RARTS minimizes lam G jointly in x as well: on the quadratic, whose G is linear in x, that is unbounded;
    # the DARTS toy's relaxed objective is convex with a closed-form stationary point
    from problems.nas.toy import rarts_fixed_point, toy_spec

    result = run(toy_spec(steps=3000, inner_lr=0.02, outer_lr=0.02), engine=config, out=tmp_path, progress=False)
    return result.x[0].reshape(1), torch.tensor([rarts_fixed_point(config.lam, config.beta)[0]], dtype=torch.float64)


FIXED_POINT_CONFIGS = {
    "darts": [(DartsConfig(order=1), _run_darts_on_the_quadratic), (DartsConfig(order=2), _run_darts_on_the_quadratic),
              (DartsConfig(order=2, hessian="exact"), _run_darts_on_the_quadratic)],
    "rarts": [(RartsConfig(lam=10.0, beta=10.0), _run_rarts_on_the_analytic_toy)],
}


@pytest.mark.parametrize("case", [c for cs in FIXED_POINT_CONFIGS.values() for c in cs], ids=lambda c: repr(c[0]))
def test_alternating_engine_reaches_its_closed_form_fixed_point(case, tmp_path) -> None:
    config, runner = case
    reached, expected = runner(config, tmp_path)
    assert float((reached - expected).norm()) <= 1e-8 * max(1.0, float(expected.norm()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("config", [c for cs in HYPERGRADIENT_CONFIGS.values() for c in cs], ids=repr)
def test_quadratic_hypergradient_matches_closed_form(config) -> None:
    problem = compile_spec(quadratic_spec(inner_steps=400))
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    assert _rel(result.grad[0], quadratic_hypergrad(x[0], quadratic_data())) < 1e-4
    assert float(result.stats.inner_residual) < 1e-8
    assert result.stats.inner_steps == 400 and result.stats.hvp_count > 0


@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("config", [c for cs in HYPERGRADIENT_CONFIGS.values() for c in cs[:2]], ids=repr)
def test_ridge_hypergradient_matches_closed_form(config, per_feature: bool) -> None:
    problem = compile_spec(ridge_spec(per_feature=per_feature))
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    reference = ridge_hypergrad(x[0], ridge_data(), ridge_val_data())
    assert result.grad[0].shape == reference.shape
    assert _rel(result.grad[0], reference) < 1e-4


def _implicit_solution() -> torch.Tensor:
    """x* of the quadratic toy: the hypergradient rho x + M^T (M x - c) = 0 with M = A^{-1} B."""
    data = quadratic_data()
    M = torch.linalg.solve(data["A"], data["B"])
    return torch.linalg.solve(M.T @ M + 0.1 * torch.eye(M.shape[1], dtype=M.dtype), M.T @ data["c"])


@pytest.mark.parametrize("kind", sorted(SOLUTION_CONFIGS))
def test_engine_reaches_the_implicit_solution_on_the_quadratic(kind: str, tmp_path) -> None:
    config, outer, steps, tolerance = SOLUTION_CONFIGS[kind]
    # warm-started unrolling differentiates through the last T steps only: T = 100 makes that tail negligible
    inner_steps = 100 if kind == "unrolled" else 30
    data = quadratic_spec(inner_steps=inner_steps, steps=steps, checkpoint_every=None).model_dump(mode="json")
    data["levels"]["upper"]["solver"] = outer
    data["levels"]["lower"]["solver"]["warm_start"] = True
    result = run(spec_from_data(data), engine=config, out=tmp_path, progress=False)
    assert _rel(result.x[0], _implicit_solution()) < tolerance


@pytest.mark.parametrize("kind", sorted(BEST_RESPONSE_CONFIGS))
def test_best_response_engine_reaches_the_implicit_solution_on_the_quadratic(kind: str, tmp_path) -> None:
    config, steps, tolerance = BEST_RESPONSE_CONFIGS[kind]
    spec = quadratic_stn_spec(steps=steps, checkpoint_every=None, log_every=100)
    result = run(spec, engine=config, out=tmp_path, progress=False)
    assert _rel(result.x[0], _implicit_solution()) < tolerance
    fields = json.loads((tmp_path / "result.json").read_text())["last_stats"]
    assert {"inner_residual", "linear_residual", "hvp_count", "inner_steps", "time_s"} <= set(fields)


@pytest.mark.parametrize("kind", sorted(SOLUTION_CONFIGS))
def test_stats_have_the_same_fields_for_every_engine(kind: str) -> None:
    config = SOLUTION_CONFIGS[kind][0]
    problem = compile_spec(quadratic_spec(inner_steps=20))
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    fields = result.stats.as_floats()
    assert set(fields) == {"inner_residual", "linear_residual", "hvp_count", "inner_steps", "time_s"}
    assert fields["inner_residual"] >= 0 and fields["time_s"] >= 0
    from bilevel.engines import engine_capabilities

    if not engine_capabilities()[kind].needs_hvp:
        assert fields["hvp_count"] == 0


def test_minibatched_lower_data_runs() -> None:
    data = ridge_spec(inner_steps=50).model_dump(mode="json")
    data["levels"]["lower"]["data"]["batch_size"] = 8
    problem = compile_spec(spec_from_data(data))
    x = problem.fresh(problem.upper.init)
    for config in (ImplicitConfig(), UnrolledConfig(checkpoint_every=10)):
        engine = build_engine(config)
        result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
        assert torch.isfinite(result.grad[0]).all()
