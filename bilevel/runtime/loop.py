"""The outer loop: hypergradient, outer optimizer step, metrics, checkpoints, NaN guard, resume.

Per outer step k (x_k the upper variables):
    g_k = engine.hypergrad(problem, x_k, state_k)      (lower solve warm-started from state_k)
    x_{k+1} = Proj(outer_optimizer.step(x_k, g_k))
One host synchronization per outer step reads the loss and gradient norm (for the NaN guard,
the progress bar and metrics); nothing inside the inner loop or the linear solve synchronizes.

Launched by torchrun with several processes, the run is data parallel (bilevel.distributed):
every rank runs this loop on its data shards with replicated variables, the engines return the
union's hypergradient, and only rank 0 writes outputs (metrics, TensorBoard events, checkpoints,
result.json, the problem's report and monitor files)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from bilevel.compile import compile_spec, resolve_device
from bilevel.data import evaluate_on_all_data
from bilevel.distributed import broadcast_from_main, current_world, data_parallel, sum_over_ranks
from bilevel.engines import build_engine, engine_capabilities
from bilevel.engines.base import EngineState
from bilevel.engines.inner import lower_start, solve_lower
from bilevel.hyperparameters import Categorical
from bilevel.instances import BatchedProblem
from bilevel.linalg.tree import tree_norm
from bilevel.multilevel.chain import ChainProblem
from bilevel.multilevel.registry import build_chain_engine
from bilevel.optim import InnerOptimizer
from bilevel.planner import Plan, make_plan
from bilevel.problem import Params, Problem
from bilevel.runtime.callbacks import MetricsWriter, Progress
from bilevel.runtime.outer import build_outer_optimizer, scheduled_lr
from bilevel.runtime.checkpoint import CHECKPOINT_NAME, atomic_write_json
from bilevel.runtime.snapshot import WorldSizeMismatch, load_snapshot, save_snapshot
from bilevel.spec.load import LoadedSpec
from bilevel.spec.problem import BilevelSpec

__all__ = ["TRACKED_UPPER_NUMEL", "DivergenceError", "RunResult", "hypergrad_at_init", "run", "to_nested"]

TRACKED_UPPER_NUMEL = 16
"""Upper tensor variables with at most this many entries are logged in every metrics record
(under "upper"), so that hyperparameter trajectories need no monitor."""


class DivergenceError(RuntimeError):
    """The upper loss or the hypergradient became NaN/inf; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class RunResult:
    """What a run produced: the result.json contents, its directory and the final variables."""

    result: dict[str, Any]
    out: Path
    x: Params = field(repr=False)
    y: Params = field(repr=False)


def to_nested(value: Any) -> Any:
    """Tensors (or dicts of them) as nested Python lists for JSON; other values (a categorical
    hyperparameter's string) as they are."""
    if isinstance(value, dict):
        return {k: to_nested(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def _fingerprint(loaded: LoadedSpec) -> str:
    data = loaded.spec.model_dump(mode="json")
    for key in ("steps", "out", "checkpoint_every", "log_every", "monitor_every", "tensorboard", "distributed"):
        data["run"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _as_loaded(spec: LoadedSpec | BilevelSpec) -> LoadedSpec:
    return spec if isinstance(spec, LoadedSpec) else LoadedSpec(spec)


def _prepare(loaded: LoadedSpec, engine: Any, device: str | torch.device | None) -> tuple[Problem, Plan, Any]:
    problem = compile_spec(loaded, device)
    # data parallel: every rank runs rank 0's plan (shard sizes and free device memory, which the
    # planner reads, can differ between ranks, and so could the engine configuration)
    plan = broadcast_from_main(make_plan(loaded, problem, engine))
    if isinstance(problem, ChainProblem):  # more than two levels: the engine of that kind for chains
        return problem, plan, build_chain_engine(plan.engine)
    return problem, plan, build_engine(plan.engine)


def hypergrad_at_init(loaded: LoadedSpec | BilevelSpec, engine: Any = None, device: str | None = None) -> dict[str, Any]:
    """The hypergradient at the upper variables' initial values, after the lower solve the spec
    declares (what `bilevel hypergrad` prints)."""
    loaded = _as_loaded(loaded)
    with _world(loaded, device) as (_, rank_device):
        problem, plan, eng = _prepare(loaded, engine, rank_device)
        x = problem.fresh(problem.upper.init)
        result = eng.hypergrad(problem, x, eng.init(problem, x), problem.upper.batch())
    is_hypergradient = engine_capabilities()[plan.engine.kind].returns_hypergradient
    return {
        "engine": plan.engine.kind,
        "upper_loss": float(result.upper_loss),
        "hypergradient": to_nested(problem.upper.variables(result.grad)),
        "is_hypergradient": is_hypergradient,
        "stats": result.stats.as_floats(),
        "plan_reasons": plan.reasons,
        "device": str(problem.device),
    }


def _world(loaded: LoadedSpec, device: str | torch.device | None) -> Any:
    """The data-parallel context of a run (a single process unless launched by torchrun)."""
    settings = loaded.spec.run.distributed
    requested = resolve_device(str(device) if device is not None else loaded.spec.run.device)
    return data_parallel(requested, settings.backend, settings.timeout_s)


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
) -> RunResult:
    """Run the outer loop the spec describes; write metrics.jsonl, checkpoints and result.json.

    ``engine`` (an engine config such as ImplicitConfig()) overrides the spec and the planner.
    ``on_step(step, x, y)`` is called after every outer step with the detached upper and lower
    variables (for traces and custom logging; it must not modify them). ``on_record(record)`` is
    called with every metrics record (what metrics.jsonl receives); returning a string ends the
    run after that step with the string as its stop reason (status "stopped_early"; used for
    pruning by sweeps). ``tensorboard`` overrides run.tensorboard.

    Launched by torchrun with several processes (or with torch.distributed initialized by the
    caller), the run is data parallel; every rank returns the same RunResult."""
    loaded = _as_loaded(loaded)
    with _world(loaded, device) as (_, rank_device):
        return _run(loaded, engine, rank_device, out, resume, progress, log, on_step, tensorboard, on_record)


def _run(
    loaded: LoadedSpec,
    engine: Any,
    device: torch.device,
    out: str | Path | None,
    resume: bool,
    progress: bool,
    log: Any,
    on_step: Callable[[int, Params, Params], None] | None,
    tensorboard: bool | None,
    on_record: Callable[[dict[str, Any]], str | None] | None,
) -> RunResult:
    spec = loaded.spec
    world = current_world()
    main = world.is_main
    problem, plan, eng = _prepare(loaded, engine, device)
    out_dir = Path(out if out is not None else spec.run.out)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    say = (log or (lambda message: None)) if main else (lambda message: None)
    for warning in plan.warnings:
        say(f"warning: {warning}")

    upper = problem.upper
    x = problem.fresh(upper.init, requires_grad=True)
    outer_spec = spec.levels[upper.name].solver
    optimizer = build_outer_optimizer(outer_spec, x)
    state = eng.init(problem, x)
    start_step = 0
    fingerprint = _fingerprint(loaded)

    try:
        loaded_snapshot = load_snapshot(out_dir) if resume else None
    except WorldSizeMismatch as exc:
        raise loaded.error("", str(exc)) from None
    checkpoint, local = loaded_snapshot if loaded_snapshot is not None else (None, None)
    if resume and checkpoint is None:
        say(f"no checkpoint in {out_dir}; starting from the beginning")
    if checkpoint is not None:
        assert local is not None
        if checkpoint["fingerprint"] != fingerprint:
            raise loaded.error("", f"the checkpoint in {out_dir} was written for a different spec; use another --out or drop --resume")
        with torch.no_grad():
            for p, saved in zip(x, checkpoint["x"]):
                p.copy_(saved.to(p.device, p.dtype))
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = EngineState.from_state_dict(_to_device(checkpoint["engine_state"], problem.device))
        for name, level in problem.levels.items():  # this rank's data streams, over its shards
            if level.data is not None and name in local["data"]:
                level.data.load_state_dict(local["data"][name])
        torch.set_rng_state(local["rng"])
        start_step = int(checkpoint["step"])
        say(f"resuming from step {start_step} ({out_dir / CHECKPOINT_NAME})")

    def snapshot(step: int) -> Path:
        """Checkpoint at ``step`` (collective: every rank calls it, rank 0 writes)."""
        replicated = {
            "step": step,
            "fingerprint": fingerprint,
            "x": [p.detach().cpu() for p in x],
            "optimizer": optimizer.state_dict(),
            "engine_state": _to_device(state.state_dict(), torch.device("cpu")),
        }
        local = {
            "data": {n: lvl.data.state_dict() for n, lvl in problem.levels.items() if lvl.data is not None},
            "rng": torch.get_rng_state(),
        }
        return save_snapshot(out_dir, replicated, local)

    resumed_at = start_step if checkpoint is not None else None
    metrics = MetricsWriter(out_dir / "metrics.jsonl", resumed_at) if main else None
    board = None
    if main and (spec.run.tensorboard if tensorboard is None else tensorboard):
        from bilevel.runtime.tensorboard import TensorBoardLogger

        board = TensorBoardLogger(out_dir / "tensorboard", resumed_at)
    tracked = _tracked_upper(problem)
    bar = Progress(spec.run.steps, start_step, progress and main, f"{spec.name} [{plan.engine.kind}]")
    began = time.perf_counter()
    last_checkpoint: Path | None = out_dir / CHECKPOINT_NAME if checkpoint is not None else None
    last_stats: dict[str, Any] = {}
    final_step, stop_reason = spec.run.steps, None
    try:
        for step in range(start_step, spec.run.steps):
            result = eng.hypergrad(problem, x, state, upper.batch())
            if result.stop is not None:
                final_step, stop_reason = step, result.stop
                state = result.state
                if result.upper is not None:
                    with torch.no_grad():
                        for p, value in zip(x, result.upper):
                            p.copy_(value)
                say(f"stopped after {step} steps: {stop_reason}")
                break
            read = [result.upper_loss.reshape(1), tree_norm(result.grad).reshape(1)]
            with torch.no_grad():
                read += [reader(x).reshape(-1).to(read[0].dtype) for _, reader, _ in tracked]
            loss, grad_norm, *upper_values = torch.cat(read).tolist()  # the one host sync of the step
            if not (_finite(loss) and _finite(grad_norm)):
                message = (
                    f"step {step + 1}: the {'upper loss' if not _finite(loss) else 'hypergradient'} is not finite"
                    f" (loss={loss}, |hypergrad|={grad_norm}); stopped. Lower the outer or inner learning rate."
                )
                if last_checkpoint is not None:
                    message += f" The last good checkpoint is {last_checkpoint} (resume with --resume)."
                if main:
                    _write_result(out_dir, _result_base(loaded, problem, plan, x, step, began) | {"status": "diverged", "message": message})
                raise DivergenceError(message, step + 1, last_checkpoint)
            for p, g in zip(x, result.grad):
                p.grad = g
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(outer_spec, step, spec.run.steps)
            optimizer.step()
            state = result.state
            moved, state = eng.post_step(problem, upper.project(tuple(p.detach() for p in x)), state)
            with torch.no_grad():
                for p, projected in zip(x, moved):
                    p.copy_(projected)
            last_stats = result.stats.as_floats()
            record: dict[str, Any] = {}
            logged = (step + 1) % spec.run.log_every == 0 or step + 1 == spec.run.steps
            monitored = (problem.monitor is not None or _monitors_instances(problem)) and (
                (step + 1) % spec.run.monitor_every == 0 or step + 1 == spec.run.steps)
            if logged:
                record = {"step": step + 1, "upper_loss": loss, "hypergrad_norm": grad_norm, **last_stats,
                          "elapsed_s": time.perf_counter() - began}
                if tracked:
                    record["upper"] = _unflatten_tracked(tracked, upper_values)
            if main and monitored:  # the monitor runs on rank 0 only (it may write files)
                record = {"step": step + 1, **record, "monitor": _monitor(problem, x, state, step + 1, out_dir)}
            if record and metrics is not None:
                metrics.write(record)
            if record and board is not None:
                board.write(record)
            bar.update(step + 1, loss, grad_norm)
            if on_step is not None:
                on_step(step + 1, tuple(p.detach() for p in x), state.lower)
            every = spec.run.checkpoint_every
            if every is not None and (step + 1) % every == 0:
                last_checkpoint = snapshot(step + 1)
            if (logged or monitored) and on_record is not None:
                stop = broadcast_from_main(on_record(record))  # rank 0 decides for every rank
                if stop is not None:
                    final_step, stop_reason = step + 1, str(stop)
                    say(f"stopped after {step + 1} steps: {stop_reason}")
                    break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()

    snapshot(final_step)
    wall = time.perf_counter() - began
    y, final_loss, instance_losses = _final_evaluation(problem, x, state, eng)
    result_json = _result_base(loaded, problem, plan, x, final_step, began) | {
        "status": "completed" if stop_reason is None else "stopped_early",
        "final_upper_loss": final_loss,
        "last_stats": last_stats,
        "wall_time_s": wall,
    }
    if stop_reason is not None:
        result_json["stop_reason"] = stop_reason
    if main:
        if problem.report is not None:
            view = upper.view(tuple(p.detach() for p in x))
            result_json["report"] = _jsonable(problem.report(view, problem.lower.view(y), out_dir=out_dir))
        if instance_losses is not None:  # final loss above is the sum over instances; each one's results here
            result_json["instances"] = problem.instance_results(x, y, instance_losses, out_dir)
        execution = getattr(eng, "execution_report", None)
        if execution is not None:
            result_json["fast_path"] = execution()
        _write_result(out_dir, result_json)
    result_json = broadcast_from_main(result_json)  # every rank returns rank 0's result (with its report)
    return RunResult(result_json, out_dir, tuple(p.detach() for p in x), y)


def _tracked_upper(problem: Problem) -> list[tuple[str, Callable[[Params], torch.Tensor], tuple[int, ...]]]:
    """(name, reader, shape) of the upper tensor variables small enough to log every step. The
    reader gives the value in user units, as objectives see it (a hyperparameter through its
    transform; a categorical one with string choices as the index of its choice)."""
    upper = problem.upper
    tracked = []
    for name, index in upper.tensors.items():
        transform = upper.transforms.get(name)
        if transform is None:
            reader = lambda x, i=index: x[i]  # noqa: E731
        elif isinstance(transform, Categorical) and transform.table is None:
            reader = lambda x, i=index: torch.argmax(x[i])  # noqa: E731
        else:
            reader = lambda x, i=index, t=transform: t.value(x[i])  # noqa: E731
        sample = reader(upper.init)
        if sample.numel() <= TRACKED_UPPER_NUMEL:
            tracked.append((name, reader, tuple(sample.shape)))
    return tracked


def _unflatten_tracked(tracked: list[tuple[str, Any, tuple[int, ...]]], values: list[float]) -> dict[str, Any]:
    """Tracked variable name -> its value (a number, or a flat list for a tensor with several entries)."""
    out: dict[str, Any] = {}
    offset = 0
    for name, _, shape in tracked:
        n = math.prod(shape)
        chunk = values[offset : offset + n]
        out[name] = chunk[0] if not shape else chunk
        offset += n
    return out


def _monitor(problem: Problem, x: Params, state: EngineState, step: int, out_dir: Path) -> dict[str, Any]:
    """The spec's monitor at the current variables, as JSON-ready values."""
    if problem.instances:
        return {"instances": problem.monitor_instances(x, state.lower, step, out_dir)}
    assert problem.monitor is not None
    with torch.no_grad():
        values = problem.monitor(problem.upper.view(tuple(p.detach() for p in x)), problem.lower.view(state.lower),
                                 step=step, out_dir=out_dir)
    return _jsonable(dict(values or {}))


def _monitors_instances(problem: Problem) -> bool:
    return bool(problem.instances) and problem.members[0].monitor is not None


def _final_evaluation(problem: Problem, x: Params, state: EngineState, engine: Any) -> tuple[Params, float, list[float] | None]:
    """Solve the lower level at the final x (warm-started) and evaluate F on the full upper data,
    one upper minibatch at a time when the upper data declares a batch size (weighted by the
    batches' sizes: ``bilevel.data.evaluate_on_all_data``), so that the evaluation needs no more
    memory than a training step. For a chain of levels, the engine solves all the levels below
    the top its own way. A best-response model (STN) is already the lower solution at x, trained
    for as many steps as the run took: it is evaluated as it is, with no further training.

    Returns (y, F, the instances' F_k or None): for a batch of instances the F_k are evaluated
    (summed over ranks, as F is) and F is their sum."""
    if isinstance(problem, ChainProblem):
        y = engine.solve_below(problem, x, state)
    elif engine.capabilities.needs_best_response:
        y = state.lower
    else:
        lower = problem.lower
        optimizer = InnerOptimizer(lower.solver)
        y0 = lower_start(problem, state)
        y, _ = solve_lower(problem, optimizer, x, y0, optimizer.init(y0), lower.solver.steps)
    xd = tuple(p.detach() for p in x)
    batched = isinstance(problem, BatchedProblem)
    objective = problem.upper_objective_per_instance if batched else problem.upper_objective
    with torch.no_grad():
        local = evaluate_on_all_data(lambda batch: objective(xd, y, batch), problem.upper.data)
        (loss,) = sum_over_ranks((local,))
    if batched:
        return y, float(loss.sum()), loss.tolist()
    return y, float(loss), None


def _result_base(loaded: LoadedSpec, problem: Problem, plan: Plan, x: Params, steps: int, began: float) -> dict[str, Any]:
    return {
        "name": loaded.spec.name,
        "spec": loaded.file,
        "engine": plan.engine.kind,
        "engine_config": plan.engine.model_dump(mode="json"),
        "plan_reasons": plan.reasons,
        "plan_warnings": plan.warnings,
        "steps": steps,
        "device": str(problem.device),
        "world_size": current_world().size,
        "dtype": str(problem.dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": time.perf_counter() - began,
        "upper_variables": to_nested(problem.upper.values(x)),  # hyperparameters in their declared units
        "resolved_spec": loaded.spec.model_dump(mode="json"),  # after --set: what reports compare runs by
    }


def _write_result(out_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "result.json", result)


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
