"""The outer loop: compile, plan, then outer steps with records and checkpoints, then outputs.

    spec -> Problem (bilevel.compile) -> Plan (bilevel.planner) -> engine (bilevel.engines)
         -> Session: outer steps (runtime.step), records (runtime.records), checkpoints (runtime.checkpoint)
         -> result.json (runtime.outputs)

Launched by torchrun with several processes, the run is data parallel (bilevel.distributed):
every rank runs this loop on its data shards with replicated variables, the engines return the
union's hypergradient, and only rank 0 writes outputs (metrics, TensorBoard events, checkpoints,
result.json, the problem's report and monitor files)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bilevel.compile import compile_spec, resolve_device
from bilevel.distributed import broadcast_from_main, current_world, data_parallel
from bilevel.engines.base import Engine
from bilevel.engines.registry import build_engine
from bilevel.plain import plain
from bilevel.planner import Plan, make_plan
from bilevel.problem import Params, Problem
from bilevel.runtime.atomic import CHECKPOINT_NAME
from bilevel.runtime.callbacks import Progress
from bilevel.runtime.outputs import DivergenceError, RunResult, final_evaluation, finished_result, result_base, write_result
from bilevel.runtime.run_dir import RunDirectory, check_out_path
from bilevel.runtime.failures import user_code_failure
from bilevel.runtime.records import Recorder, TrackedUpper, monitor_values, monitored
from bilevel.runtime.session import Session
from bilevel.runtime.signals import RunInterrupted, StopSignals
from bilevel.runtime.spec_record import write_spec_record
from bilevel.runtime.step import outer_step
from bilevel.spec.errors import SpecError
from bilevel.spec.load import LoadedSpec
from bilevel.spec.problem import BilevelSpec
from bilevel.spec.run import RunSpec

__all__ = ["DivergenceError", "RunResult", "hypergrad_at_init", "run", "to_nested"]

to_nested = plain
"""Tensors (or dicts of them) as nested Python lists for JSON (``bilevel.plain.plain``)."""


def _as_loaded(spec: LoadedSpec | BilevelSpec) -> LoadedSpec:
    return spec if isinstance(spec, LoadedSpec) else LoadedSpec(spec)


def _prepare(loaded: LoadedSpec, engine: Any, device: str | torch.device | None) -> tuple[Problem, Plan, Engine]:
    problem = compile_spec(loaded, device)
    # data parallel: every rank runs rank 0's plan (shard sizes and free device memory, which the
    # planner reads, can differ between ranks, and so could the engine configuration)
    plan = broadcast_from_main(make_plan(problem, engine))
    return plan.applied(problem), plan, build_engine(plan.engine)


def _world(loaded: LoadedSpec, device: str | torch.device | None) -> Any:
    """The data-parallel context of a run (a single process unless launched by torchrun)."""
    settings = loaded.spec.run.distributed
    requested = resolve_device(str(device) if device is not None else loaded.spec.run.device)
    return data_parallel(requested, settings.backend, settings.timeout_s)


def hypergrad_at_init(loaded: LoadedSpec | BilevelSpec, engine: Any = None, device: str | None = None) -> dict[str, Any]:
    """The hypergradient at the upper variables' initial values, after the lower solve the spec
    declares (what `bilevel hypergrad` prints). ``engine``: a config, a mapping or a kind's name."""
    loaded = _as_loaded(loaded)
    with _world(loaded, device) as (_, rank_device):
        problem, plan, eng = _prepare(loaded, engine, rank_device)
        x = problem.fresh(problem.upper.init)
        result = eng.hypergrad(problem, x, eng.init(problem, x), problem.upper.batch())
    return {
        "engine": plan.engine.kind,
        "upper_loss": float(result.upper_loss),
        "hypergradient": plain(problem.upper.variables(result.grad)),
        "is_hypergradient": result.is_hypergradient,
        "stats": result.stats.as_floats(),
        "plan_reasons": plan.reasons,
        "device": str(problem.device),
    }


def run(
    loaded: LoadedSpec | BilevelSpec,
    engine: Any = None,
    device: str | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Any = None,
    on_step: Callable[[int, Params, Params], None] | None = None,
    tensorboard: bool | None = None,
    on_record: Callable[[dict[str, Any]], str | None] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Run the outer loop the spec describes; write metrics.jsonl, checkpoints and result.json.

    ``engine`` (an engine config such as ImplicitConfig(), a mapping, or a kind's name) overrides
    the spec and the planner. ``on_step(step, x, y)`` is called after every outer step with the
    detached upper and lower variables (for traces and custom logging; it must not modify them).
    ``on_record(record)`` is called with every metrics record (what metrics.jsonl receives);
    returning a string ends the run after that step with the string as its stop reason (status
    "stopped_early"; used for pruning by sweeps). ``tensorboard`` overrides run.tensorboard.
    The run directory is claimed first (``bilevel.runtime.run_dir``): a SpecError when another run
    holds it, or when it holds another problem's run and ``overwrite`` is not set.

    Launched by torchrun with several processes (or with torch.distributed initialized by the
    caller), the run is data parallel; every rank returns the same RunResult."""
    loaded = _as_loaded(loaded)
    with _world(loaded, device) as (_, rank_device):
        problem, plan, eng = _prepare(loaded, engine, rank_device)
        settings = loaded.spec.run
        out_dir = check_out_path(out if out is not None else settings.out.replace("{name}", problem.name),
                                 "run.out" if out is None else "out")
        loop = _Loop(problem, plan, eng, settings, out_dir, loaded, log)
        with _claimed(out_dir, problem, loaded.file, resume, overwrite):
            return loop.run(resume, progress, on_step, settings.tensorboard if tensorboard is None else tensorboard,
                            on_record)


@contextlib.contextmanager
def _claimed(out_dir: Path, problem: Problem, file: str, resume: bool, overwrite: bool) -> Iterator[None]:
    """Rank 0 holds the run directory (``bilevel.runtime.run_dir``); every rank learns whether it may run."""
    claim = RunDirectory(out_dir, problem.fingerprint, file, resume=resume, overwrite=overwrite)
    refused = None
    if current_world().is_main:
        try:
            claim.__enter__()
        except SpecError as exc:
            refused = exc.issues
    refused = broadcast_from_main(refused)
    if refused:
        raise SpecError(refused)
    try:
        yield
    finally:
        if current_world().is_main:
            claim.__exit__(None, None, None)


class _Loop:
    """One run's outer loop over a Session (see the module docstring)."""

    def __init__(self, problem: Problem, plan: Plan, engine: Engine, settings: RunSpec, out_dir: Path, loaded: LoadedSpec,
                 log: Any):
        self.problem, self.plan, self.engine, self.settings = problem, plan, engine, settings
        self.out_dir, self.loaded = out_dir, loaded
        self.main = current_world().is_main
        self.say = (log or (lambda message: None)) if self.main else (lambda message: None)

    def run(self, resume: bool, progress: bool, on_step: Any, tensorboard: bool, on_record: Any) -> RunResult:
        problem, settings, out_dir, say = self.problem, self.settings, self.out_dir, self.say
        if self.main:
            write_spec_record(out_dir, self.loaded, problem.fingerprint)
        for warning in self.plan.warnings:
            say(f"warning: {warning}")
        session = Session.start(problem, self.engine)
        if resume:
            if session.resume(out_dir):
                say(f"resuming from step {session.step} ({out_dir / CHECKPOINT_NAME})")
            else:
                say(f"no checkpoint in {out_dir}; starting from the beginning")
        bar = Progress(settings.steps, session.step, progress and self.main, f"{problem.name} [{self.plan.engine.kind}]")
        recorder = Recorder(out_dir, self.main, session.step if session.resumed else None, tensorboard, bar)
        began = time.perf_counter()
        last_checkpoint: Path | None = out_dir / CHECKPOINT_NAME if session.resumed else None
        try:
            final_step, stop_reason, last_stats = self._steps(session, recorder, began, last_checkpoint, on_step, on_record)
        finally:
            recorder.close()
        session.step = final_step
        session.save(out_dir)
        return self._finish(session, began, final_step, stop_reason, last_stats)

    def _steps(self, session: Session, recorder: Recorder, began: float, last_checkpoint: Path | None,
               on_step: Any, on_record: Any) -> tuple[int, str | None, dict[str, Any]]:
        """Outer steps from the session's step; returns (final step, stop reason, last stats)."""
        problem, settings = self.problem, self.settings
        tracked = TrackedUpper(problem)
        has_monitor = monitored(problem)
        last_stats: dict[str, Any] = {}
        with StopSignals() as stops:
            for step in range(session.step, settings.steps):
                try:
                    done, stop, last_stats, last_checkpoint = self._one_step(
                        session, recorder, tracked, has_monitor, step, began, last_checkpoint, on_step, on_record, last_stats)
                except (SpecError, DivergenceError, RunInterrupted):
                    raise
                except Exception as exc:
                    self._failed(exc, session, step, last_checkpoint, began)
                    raise
                if stop is not None:
                    return done, stop, last_stats
                if stops.received is not None:
                    self._interrupted(session, stops.received, done, began)
        return settings.steps, None, last_stats

    def _one_step(self, session: Session, recorder: Recorder, tracked: TrackedUpper, has_monitor: bool, step: int,
                  began: float, last_checkpoint: Path | None, on_step: Any, on_record: Any, last_stats: dict[str, Any]
                  ) -> tuple[int, str | None, dict[str, Any], Path | None]:
        """Outer step ``step`` with its records, checkpoint and callbacks; returns (steps done, stop
        reason or None, its stats, the last checkpoint)."""
        problem, settings, out_dir = self.problem, self.settings, self.out_dir
        outcome = outer_step(session, tracked, step, settings.steps)
        if outcome.stop is not None:
            self.say(f"stopped after {step} steps: {outcome.stop}")
            return step, outcome.stop, last_stats, last_checkpoint
        if outcome.diverged:
            self._diverged(session, step, outcome.loss, outcome.grad_norm, last_checkpoint, began)
        last_stats = outcome.result.stats.as_floats()
        done = step + 1
        record: dict[str, Any] = {}
        logged = done % settings.log_every == 0 or done == settings.steps
        monitor_now = has_monitor and (done % settings.monitor_every == 0 or done == settings.steps)
        if logged:
            record = {"step": done, "upper_loss": outcome.loss, "hypergrad_norm": outcome.grad_norm, **last_stats,
                      "elapsed_s": time.perf_counter() - began}
            if tracked:
                record["upper"] = tracked.unflatten(outcome.upper_values)
        if self.main and monitor_now:  # the monitor runs on rank 0 only (it may write files)
            record = {"step": done, **record, "monitor": monitor_values(problem, session.x, session.state.lower, done, out_dir)}
        recorder.write(record)
        recorder.progress.update(done, outcome.loss, outcome.grad_norm)
        if on_step is not None:
            on_step(done, session.upper, session.state.lower)
        if settings.checkpoint_every is not None and done % settings.checkpoint_every == 0:
            last_checkpoint = session.save(out_dir)
        if (logged or monitor_now) and on_record is not None:
            stop = broadcast_from_main(on_record(record))  # rank 0 decides for every rank
            if stop is not None:
                self.say(f"stopped after {done} steps: {stop}")
                return done, str(stop), last_stats, last_checkpoint
        return done, None, last_stats, last_checkpoint

    def _failed(self, exc: Exception, session: Session, step: int, checkpoint: Path | None, began: float) -> None:
        """User code raised at outer step ``step``: a UserCodeFailure naming it, result.json saying
        so and the last good checkpoint kept (``bilevel.runtime.failures``); other errors pass."""
        failure = user_code_failure(exc, self.problem, session, step + 1, checkpoint)
        if failure is None:
            return
        self._write_stopped(session, step, began, "failed", str(failure))
        raise failure from exc

    def _interrupted(self, session: Session, signum: int, done: int, began: float) -> None:
        """A signal arrived during step ``done``: checkpoint, result.json, RunInterrupted."""
        checkpoint = session.save(self.out_dir)
        error = RunInterrupted(signum, done, checkpoint)
        self._write_stopped(session, done, began, "interrupted", str(error))
        raise error

    def _diverged(self, session: Session, step: int, loss: float, grad_norm: float, checkpoint: Path | None, began: float) -> None:
        """Stop with a DivergenceError, result.json saying so and the last good checkpoint kept."""
        bad = "upper loss" if not (loss == loss and abs(loss) != float("inf")) else "hypergradient"
        message = (f"step {step + 1}: the {bad} is not finite (loss={loss}, |hypergrad|={grad_norm}); stopped."
                   " Lower the outer or inner learning rate.")
        if checkpoint is not None:
            message += f" The last good checkpoint is {checkpoint} (resume with --resume)."
        self._write_stopped(session, step, began, "diverged", message)
        raise DivergenceError(message, step + 1, checkpoint)

    def _write_stopped(self, session: Session, steps: int, began: float, status: str, message: str) -> None:
        """result.json of a run that stopped before its end (rank 0 writes it)."""
        if self.main:
            base = result_base(self.problem, self.plan, self.loaded, session.x, steps, began)
            write_result(self.out_dir, base | {"status": status, "message": message})

    def _finish(self, session: Session, began: float, final_step: int, stop_reason: str | None,
                last_stats: dict[str, Any]) -> RunResult:
        problem = self.problem
        wall = time.perf_counter() - began
        y, final_loss, instance_losses = final_evaluation(problem, self.engine, session.x, session.state)
        result = result_base(problem, self.plan, self.loaded, session.x, final_step, began) | {
            "status": "completed" if stop_reason is None else "stopped_early",
            "final_upper_loss": final_loss,
            "last_stats": last_stats,
            "wall_time_s": wall,
        }
        if stop_reason is not None:
            result["stop_reason"] = stop_reason
        if self.main:
            result = finished_result(problem, self.engine, result, session.x, y, final_loss, instance_losses, self.out_dir)
            write_result(self.out_dir, result)
        result = broadcast_from_main(result)  # every rank returns rank 0's result (with its report)
        return RunResult(result, self.out_dir, session.upper, y)
