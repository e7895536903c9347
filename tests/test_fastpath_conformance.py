"""The conformance suite with the fast path on (CPU).

Every hypergradient configuration of tests/test_engines_conformance.py runs again with
``fast_path: cuda_graph`` through the replay backend, which keeps a CUDA graph's contract
(static input buffers, outputs written in place, Python decisions frozen at capture) and
captures at the first call, so every checked hypergradient is a replay. The slow variant runs
the same checks with ``fast_path: compile`` (the inner loop through torch.compile)."""

from __future__ import annotations

import pytest

import test_engines_conformance as conformance
from bilevel.fastpath import ReplayBackend, set_graph_backend

CONFIGS = [c for cs in conformance.HYPERGRADIENT_CONFIGS.values() for c in cs]


@pytest.fixture(autouse=True)
def replay_everything():
    set_graph_backend(ReplayBackend, capture_at_sighting=1)
    yield
    set_graph_backend(None)


def _with(config, mode: str):
    return config.model_copy(update={"fast_path": mode})


@pytest.mark.parametrize("config", [_with(c, "cuda_graph") for c in CONFIGS], ids=repr)
def test_quadratic_hypergradient_matches_closed_form(config) -> None:
    conformance.test_quadratic_hypergradient_matches_closed_form(config)


@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("config", [_with(c, "cuda_graph") for cs in conformance.HYPERGRADIENT_CONFIGS.values() for c in cs[:2]], ids=repr)
def test_ridge_hypergradient_matches_closed_form(config, per_feature: bool) -> None:
    conformance.test_ridge_hypergradient_matches_closed_form(config, per_feature)


@pytest.mark.parametrize("kind", ["implicit", "unrolled"])
def test_engine_reaches_the_implicit_solution_on_the_quadratic(kind: str, tmp_path, monkeypatch) -> None:
    config, outer, steps, tolerance = conformance.SOLUTION_CONFIGS[kind]
    monkeypatch.setitem(conformance.SOLUTION_CONFIGS, kind, (_with(config, "cuda_graph"), outer, steps, tolerance))
    conformance.test_engine_reaches_the_implicit_solution_on_the_quadratic(kind, tmp_path)


@pytest.mark.parametrize("kind", ["implicit", "unrolled"])
def test_stats_have_the_same_fields_for_every_engine(kind: str, monkeypatch) -> None:
    config, *rest = conformance.SOLUTION_CONFIGS[kind]
    monkeypatch.setitem(conformance.SOLUTION_CONFIGS, kind, (_with(config, "cuda_graph"), *rest))
    conformance.test_stats_have_the_same_fields_for_every_engine(kind)


def test_minibatched_lower_data_runs(monkeypatch) -> None:
    """Minibatches fall back to eager (said once) and still give finite hypergradients."""
    implicit, unrolled = conformance.ImplicitConfig, conformance.UnrolledConfig
    monkeypatch.setattr(conformance, "ImplicitConfig", lambda **kw: implicit(fast_path="cuda_graph", **kw))
    monkeypatch.setattr(conformance, "UnrolledConfig", lambda **kw: unrolled(fast_path="cuda_graph", **kw))
    conformance.test_minibatched_lower_data_runs()


@pytest.mark.slow
@pytest.mark.parametrize("config", [_with(c, "compile") for c in CONFIGS], ids=repr)
def test_quadratic_hypergradient_matches_closed_form_compiled(config) -> None:
    conformance.test_quadratic_hypergradient_matches_closed_form(config)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["implicit", "unrolled"])
def test_engine_reaches_the_implicit_solution_compiled(kind: str, tmp_path, monkeypatch) -> None:
    config, outer, steps, tolerance = conformance.SOLUTION_CONFIGS[kind]
    monkeypatch.setitem(conformance.SOLUTION_CONFIGS, kind, (_with(config, "compile"), outer, steps, tolerance))
    conformance.test_engine_reaches_the_implicit_solution_on_the_quadratic(kind, tmp_path)
