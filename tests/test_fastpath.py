"""The fast path on CPU: no host synchronization inside a hypergradient, the capture logic
(through the replay backend, which has a CUDA graph's contract), its fallbacks and their
reasons, the compiled inner loop against the eager one, reduced precision against full
precision. CUDA-only checks at the end run where a GPU is present."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel.compile import compile_spec
from bilevel.engines import build_engine
from bilevel.engines.implicit import ImplicitEngine
from bilevel.engines.inner import solve_lower
from bilevel.fastpath import CapturedCall, CaptureMismatch, HostSyncError, ReplayBackend, accelerated, forbid_host_sync, set_graph_backend
from bilevel.fastpath import accelerator as accel
from bilevel.fastpath.compiled import first_order_step
from bilevel.fastpath.precision import _tf32, agreement, precision_scope
from bilevel.optim import InnerOptimizer
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.spec import PrecisionSpec, spec_from_data
from helpers import hypergrad_calls

HERE_OBJECTIVES = str(Path(__file__).resolve().parent / "fastpath_data" / "objectives.py")


def hyperclean(n: int = 120, d: int = 12, dtype: str = "float64", steps: int = 20, batch_size: int | None = None,
               solver: dict | None = None, lower_objective: str = "problems.hyperclean:lower_objective", **extra: Any):
    kwargs = {"dataset": "mixture", "n_train": n, "n_val": n, "d": d, "classes": 4, "seed": 0}
    data = {
        "name": "fastpath-test",
        "levels": {
            "upper": {"variables": {"lam": {"shape": [n], "init": "uniform", "init_scale": 0.5}}, "objective": "problems.hyperclean:upper_objective",
                      "data": {"source": "problems.hyperclean:val_data", "kwargs": kwargs}},
            "lower": {"parent": "upper", "variables": {"W": {"shape": [4, d]}, "b": {"shape": [4]}},
                      "objective": lower_objective, "objective_kwargs": {"mu": 1e-2},
                      "data": {"source": "problems.hyperclean:train_data", "kwargs": kwargs, "batch_size": batch_size},
                      "solver": {"name": "sgd", "lr": 0.2, "steps": steps, "warm_start": True, **(solver or {})},
                      "assumptions": {"convexity": "strongly_convex"}},
        },
        "run": {"device": "cpu", "dtype": dtype, "seed": 0},
    }
    data.update(extra)
    return spec_from_data(data)


@pytest.fixture
def replay():
    """Capture through the replay backend (a CUDA graph's contract, on CPU)."""
    set_graph_backend(ReplayBackend)
    yield
    set_graph_backend(None)


# --- host synchronization ---------------------------------------------------------------------
SYNC_FREE_CONFIGS = [
    ImplicitConfig(),
    ImplicitConfig(hvp="forward"),
    ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=8)),
    ImplicitConfig(linear_solver=LinearSolverSpec(ridge=1e-3, warm_start=False)),
    UnrolledConfig(),
    UnrolledConfig(checkpoint_every=4, truncate=10),
]


def _sync_cases() -> list[Any]:
    cases = []
    for solver in ({"name": "sgd"}, {"name": "momentum", "momentum": 0.5}, {"name": "adam", "lr": 0.01}):
        for config in SYNC_FREE_CONFIGS:
            cases.append(pytest.param(config, solver, id=f"{config.kind}-{solver['name']}-{SYNC_FREE_CONFIGS.index(config)}"))
    return cases


@pytest.mark.parametrize("config, solver", _sync_cases())
def test_a_hypergradient_never_synchronizes_the_host(config, solver) -> None:
    """Every engine call, minibatched data included, runs without reading a device value on the
    host: the precondition of CUDA-graph capture and of a GPU that never waits for Python."""
    for batch_size in (None, 32):
        problem = compile_spec(hyperclean(batch_size=batch_size, solver=solver, steps=6))
        engine = build_engine(config)
        hypergrad_calls(engine, problem, 1)  # the first call may set things up
        x = problem.fresh(problem.upper.init)
        with forbid_host_sync():
            result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
        assert torch.isfinite(result.grad[0]).all()


@pytest.mark.parametrize("action", ["item", "bool", "float", "tolist", "mask", "nonzero"])
def test_the_detector_catches_every_kind_of_sync(action: str) -> None:
    t = torch.randn(5)
    do = {
        "item": lambda: t.sum().item(),
        "bool": lambda: bool(t.sum() > 0),
        "float": lambda: float(t.sum()),
        "tolist": lambda: t.tolist(),
        "mask": lambda: t[t > 0],
        "nonzero": lambda: torch.nonzero(t),
    }[action]
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            do()
    do()  # and nothing is left armed afterwards


# --- capture (replay backend) -----------------------------------------------------------------
@pytest.mark.parametrize("config", [ImplicitConfig(fast_path="cuda_graph"), UnrolledConfig(fast_path="cuda_graph", checkpoint_every=5)], ids=repr)
def test_captured_hypergradients_equal_eager_ones(config, replay) -> None:
    problem = compile_spec(hyperclean())
    eager = hypergrad_calls(build_engine(config.model_copy(update={"fast_path": "off"})), problem, 5)
    engine = build_engine(config)
    fast = hypergrad_calls(engine, problem, 5)
    report = engine.execution_report()
    assert report["hypergradient"] == "cuda_graph", report
    for a, b in zip(fast, eager):
        assert torch.equal(a.grad[0], b.grad[0])
        assert torch.equal(a.state.lower[0], b.state.lower[0])
        assert a.state.step == b.state.step
        assert a.stats.hvp_count == b.stats.hvp_count
        assert float(a.stats.inner_residual) == float(b.stats.inner_residual)
    # results are copies: holding one across later calls does not see it change
    kept = fast[-2].grad[0].clone()
    hypergrad_calls(engine, problem, 2)
    assert torch.equal(fast[-2].grad[0], kept)


def test_a_new_shape_is_captured_anew(replay) -> None:
    engine = build_engine(ImplicitConfig(fast_path="cuda_graph"))
    for n in (60, 80, 60):
        problem = compile_spec(hyperclean(n=n))
        got = hypergrad_calls(engine, problem, 3)[-1]
        ref = hypergrad_calls(build_engine(ImplicitConfig(fast_path="off")), problem, 3)[-1]
        assert got.grad[0].shape == (n,) and torch.equal(got.grad[0], ref.grad[0])
    assert len(engine.fast._graphs) >= 2


def _reasons(engine: Any) -> str:
    return " | ".join(engine.execution_report()["reasons"])


def test_minibatches_fall_back_to_eager_with_the_reason(replay, caplog) -> None:
    problem = compile_spec(hyperclean(batch_size=32))
    engine = build_engine(ImplicitConfig(fast_path="cuda_graph"))
    with caplog.at_level(logging.WARNING, logger="bilevel.fastpath"):
        hypergrad_calls(engine, problem, 4)
    assert engine.execution_report()["hypergradient"] == "eager"
    assert "minibatches" in _reasons(engine)
    assert sum("minibatches" in r.message for r in caplog.records) == 1  # logged once


def test_a_synchronizing_objective_falls_back_to_eager(replay) -> None:
    problem = compile_spec(hyperclean(lower_objective=f"{HERE_OBJECTIVES}:syncing_lower"))
    engine = build_engine(ImplicitConfig(fast_path="cuda_graph"))
    got = hypergrad_calls(engine, problem, 4)
    ref = hypergrad_calls(build_engine(ImplicitConfig(fast_path="off")), problem, 4)
    assert engine.execution_report()["hypergradient"] == "eager"
    assert "HostSyncError" in _reasons(engine)
    assert torch.equal(got[-1].grad[0], ref[-1].grad[0])


def test_a_synchronizing_upper_objective_keeps_the_inner_loop_captured(replay) -> None:
    """Where the whole hypergradient cannot be captured (here the upper objective reads its value
    on the host; on CUDA also the direct solve, which checks its factorization there), the
    first-order inner loop still is."""
    spec = hyperclean().spec.model_dump(mode="json")
    spec["levels"]["upper"]["objective"] = f"{HERE_OBJECTIVES}:syncing_upper"
    problem = compile_spec(spec_from_data(spec))
    engine = build_engine(ImplicitConfig(fast_path="cuda_graph"))
    got = hypergrad_calls(engine, problem, 4)
    ref = hypergrad_calls(build_engine(ImplicitConfig(fast_path="off")), problem, 4)
    report = engine.execution_report()
    assert report["hypergradient"] == "eager" and report["inner_loop"] == "cuda_graph", report
    assert "whole-hypergradient capture failed" in _reasons(engine)
    for a, b in zip(got, ref):
        assert torch.equal(a.grad[0], b.grad[0])


def test_an_engine_reading_host_state_is_not_captured_whole(replay) -> None:
    class StepReading(ImplicitEngine):
        capabilities = dataclasses.replace(ImplicitEngine.capabilities, graph_safe=False)

    problem = compile_spec(hyperclean())
    engine = accelerated(StepReading(ImplicitConfig(fast_path="cuda_graph")))
    hypergrad_calls(engine, problem, 4)
    report = engine.execution_report()
    assert report["hypergradient"] == "eager" and report["inner_loop"] == "cuda_graph"
    assert "host-side state" in _reasons(engine)


def test_a_capture_that_depends_on_host_state_is_rejected() -> None:
    counter = {"n": 0}

    def fn(t: torch.Tensor) -> torch.Tensor:
        counter["n"] += 1
        return t * counter["n"]

    with pytest.raises(CaptureMismatch):
        CapturedCall(fn, (torch.ones(3),), ReplayBackend())
    good = CapturedCall(lambda t: (2 * t, "label"), (torch.ones(3),), ReplayBackend())
    out, label = good(torch.arange(3.0))
    assert torch.equal(out, torch.tensor([0.0, 2.0, 4.0])) and label == "label"


def test_cpu_auto_is_eager_and_says_why() -> None:
    problem = compile_spec(hyperclean())
    engine = build_engine(ImplicitConfig())
    hypergrad_calls(engine, problem, 3)
    report = engine.execution_report()
    assert report == {**report, "requested": "auto", "hypergradient": "eager", "inner_loop": "eager"}
    assert "CPU" in _reasons(engine)
    explicit = build_engine(ImplicitConfig(fast_path="cuda_graph"))
    hypergrad_calls(explicit, problem, 2)
    assert "needs a CUDA device" in _reasons(explicit)


# --- the compiled inner loop ------------------------------------------------------------------
def test_the_compiled_step_is_the_eager_step() -> None:
    """first_order_step (what torch.compile compiles) against solve_lower, uncompiled, for every
    optimizer, a projection and a tuned learning rate (float64, rounding only)."""
    for solver in ({"name": "sgd", "tuned": {"lr": "inner_lr"}}, {"name": "momentum"}, {"name": "adam", "lr": 0.01}):
        spec = hyperclean(solver=solver).spec.model_dump(mode="json")
        spec["levels"]["upper"]["variables"]["inner_lr"] = {"shape": [], "init": 0.15}
        spec["levels"]["lower"]["variables"]["b"]["set"] = {"low": -0.05, "high": 0.05}
        problem = compile_spec(spec_from_data(spec))
        optimizer = InnerOptimizer(problem.lower.solver)
        x = problem.fresh(problem.upper.init)
        y0 = problem.fresh(problem.lower.init)
        want, want_state = solve_lower(problem, optimizer, x, y0, optimizer.init(y0), 7)
        y, state = y0, optimizer.init(y0)
        hyper = problem.tuned_hyperparameters(x, optimizer.spec.tuned)
        for _ in range(7):
            y, state = first_order_step(problem, optimizer, x, y, state, problem.lower.batch(), hyper)
        for a, b in zip((*y, *state), (*want, *want_state)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_compile_mode_matches_eager_and_reports_its_calibration() -> None:
    problem = compile_spec(hyperclean(steps=30))
    engine = build_engine(ImplicitConfig(fast_path="compile"))
    got = hypergrad_calls(engine, problem, 4)
    ref = hypergrad_calls(build_engine(ImplicitConfig(fast_path="off")), problem, 4)
    for a, b in zip(got, ref):
        assert float((a.grad[0] - b.grad[0]).norm() / b.grad[0].norm()) < 1e-10
    report = engine.execution_report()
    assert report["inner_loop"] in ("compiled", "eager")
    calibration = report["inner_loop_calibration"]["0"]
    kept = calibration["compiled_s"] < accel._CALIBRATION_MARGIN * calibration["eager_s"]
    assert (report["inner_loop"] == "compiled") == kept, report


def _slowed(seconds: float) -> Any:
    def slow_solve_lower(problem, optimizer, x, y, state, steps=0, batches=None):
        time.sleep(seconds)
        return solve_lower(problem, optimizer, x, y, state, steps, batches)

    return slow_solve_lower


class _FakeLoop:
    """Stands in for the compiled loop with a chosen extra cost (policy tests without compiling)."""

    delay = 0.0

    def __init__(self, problem: Any, optimizer: Any, options: Any = None):
        self.compile_seconds = 0.0

    def __call__(self, problem, optimizer, x, y, state, steps=0, batches=None):
        return _slowed(self.delay)(problem, optimizer, x, y, state, steps, batches)


@pytest.mark.parametrize("compiled_delay, eager_delay, kept", [(0.0, 0.2, True), (0.2, 0.0, False)])
def test_compile_is_kept_only_where_it_is_faster(monkeypatch, compiled_delay: float, eager_delay: float, kept: bool) -> None:
    """Never slower than eager: a compiled loop slower than the eager one is dropped after one
    timed comparison, a faster one kept."""
    _FakeLoop.delay = compiled_delay
    monkeypatch.setattr(accel, "CompiledInnerLoop", _FakeLoop)
    monkeypatch.setattr(accel, "solve_lower", _slowed(eager_delay))
    problem = compile_spec(hyperclean(steps=10))
    engine = build_engine(ImplicitConfig(fast_path="compile"))
    hypergrad_calls(engine, problem, 4)
    report = engine.execution_report()
    assert (report["inner_loop"] == "compiled") == kept, report
    assert ("no gain" in _reasons(engine)) == (not kept)


# --- precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [ImplicitConfig(precision={"mode": "bf16", "check_every": 2}),
                                    UnrolledConfig(precision={"mode": "bf16", "check_every": 2})], ids=repr)
def test_bf16_hypergradients_agree_with_float32_and_say_so(config) -> None:
    problem = compile_spec(hyperclean(n=300, d=32, dtype="float32", steps=30))
    before = (torch.get_float32_matmul_precision(), torch.is_autocast_enabled("cpu"))
    got = hypergrad_calls(build_engine(config), problem, 3)
    assert (torch.get_float32_matmul_precision(), torch.is_autocast_enabled("cpu")) == before
    ref = hypergrad_calls(build_engine(config.model_copy(update={"precision": PrecisionSpec()})), problem, 3)
    for index, (a, b) in enumerate(zip(got, ref)):
        cosine, rel = agreement(a.grad, b.grad)
        assert float(cosine) >= 0.99
        assert float(rel) > 0  # it did run in reduced precision
        if index % 2 == 0:  # checked calls report their own agreement with full precision
            assert float(a.stats.extra["precision_cosine"]) >= 0.99
            assert 0 < float(a.stats.extra["precision_rel_err"]) < 0.15
        else:
            assert "precision_cosine" not in a.stats.extra
    assert set(ref[0].stats.as_floats()) == {"inner_residual", "linear_residual", "hvp_count", "inner_steps", "time_s"}


def test_precision_scopes_restore_the_settings() -> None:
    before = torch.get_float32_matmul_precision()
    with _tf32():
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError):
        with _tf32():
            raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == before
    with precision_scope("bf16", torch.device("cpu"), torch.float32):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with precision_scope("tf32", torch.device("cpu"), torch.float32):  # CUDA only: nothing changes
        assert torch.get_float32_matmul_precision() == before
    with precision_scope("bf16", torch.device("cpu"), torch.float64):  # float64 runs stay float64
        assert not torch.is_autocast_enabled("cpu")


# --- CUDA ---------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("config", [ImplicitConfig(fast_path="cuda_graph"), UnrolledConfig(fast_path="cuda_graph")], ids=repr)
def test_cuda_graph_replays_equal_eager(config) -> None:
    spec = hyperclean(n=2000, d=64, dtype="float32", steps=30).spec.model_dump(mode="json")
    spec["run"]["device"] = "cuda"
    problem = compile_spec(spec_from_data(spec))
    engine = build_engine(config)
    got = hypergrad_calls(engine, problem, 4)
    ref = hypergrad_calls(build_engine(config.model_copy(update={"fast_path": "off"})), problem, 4)
    assert engine.execution_report()["hypergradient"] == "cuda_graph", engine.execution_report()
    for a, b in zip(got, ref):
        assert float((a.grad[0] - b.grad[0]).norm() / b.grad[0].norm()) < 1e-5


@cuda
def test_cuda_hypergradients_with_minibatches_never_synchronize() -> None:
    spec = hyperclean(n=2000, d=64, dtype="float32", steps=10, batch_size=256).spec.model_dump(mode="json")
    spec["run"]["device"] = "cuda"
    problem = compile_spec(spec_from_data(spec))
    for config in (ImplicitConfig(fast_path="off"), UnrolledConfig(fast_path="off", checkpoint_every=3)):
        engine = build_engine(config)
        hypergrad_calls(engine, problem, 1)
        x = problem.fresh(problem.upper.init)
        with forbid_host_sync(cuda=True, aten=False):
            engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


@cuda
def test_cuda_compile_mode_captures_a_graph_of_compiled_kernels() -> None:
    spec = hyperclean(n=2000, d=64, dtype="float32", steps=30).spec.model_dump(mode="json")
    spec["run"]["device"] = "cuda"
    problem = compile_spec(spec_from_data(spec))
    engine = build_engine(ImplicitConfig(fast_path="compile"))
    got = hypergrad_calls(engine, problem, 4)
    ref = hypergrad_calls(build_engine(ImplicitConfig(fast_path="off")), problem, 4)
    report = engine.execution_report()
    assert report["hypergradient"] == "cuda_graph" and "compiled" in report["inner_loop"], report
    assert float((got[-1].grad[0] - ref[-1].grad[0]).norm() / ref[-1].grad[0].norm()) < 1e-4


@cuda
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_cuda_reduced_precision_agrees_with_float32(mode: str) -> None:
    spec = hyperclean(n=2000, d=64, dtype="float32", steps=30).spec.model_dump(mode="json")
    spec["run"]["device"] = "cuda"
    problem = compile_spec(spec_from_data(spec))
    before = torch.get_float32_matmul_precision()
    got = hypergrad_calls(build_engine(ImplicitConfig(precision={"mode": mode, "check_every": 1})), problem, 3)
    assert torch.get_float32_matmul_precision() == before
    assert all(float(r.stats.extra["precision_cosine"]) >= 0.99 for r in got)
