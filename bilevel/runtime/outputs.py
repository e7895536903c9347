"""What a run leaves behind: result.json (engine, plan, final upper loss and variables, the
problem's report, per-instance results, how the fast path executed) and the final evaluation
it is built from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bilevel.data import evaluate_on_all_data
from bilevel.distributed import current_world, sum_over_ranks
from bilevel.engines.base import Engine
from bilevel.meta_test import meta_test
from bilevel.plain import plain
from bilevel.planner import Plan
from bilevel.problem import Params, Problem
from bilevel.runtime.atomic import atomic_write_json
from bilevel.spec.load import LoadedSpec

__all__ = ["DivergenceError", "RunResult", "final_evaluation", "result_base", "write_result"]


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


def final_evaluation(problem: Problem, engine: Engine, x: Params, state: Any) -> tuple[Params, float, list[float] | None]:
    """The lower solution at the final x, as the engine gives it (``Engine.lower_solution``), and
    F on the full upper data, one upper minibatch at a time when the upper data declares a batch
    size (weighted by the batches' sizes: ``bilevel.data.evaluate_on_all_data``), so that the
    evaluation needs no more memory than a training step.

    Returns (y, F, the instances' F_k or None): for a batch of instances the F_k are evaluated
    (summed over ranks, as F is) and F is their sum."""
    y = engine.lower_solution(problem, x, state)
    xd = tuple(p.detach() for p in x)
    with torch.no_grad():
        local = evaluate_on_all_data(lambda batch: problem.upper_losses(xd, y, batch), problem.upper.data)
        (losses,) = sum_over_ranks((local,))
    return y, float(losses.sum()), losses.tolist() if problem.instance_batch else None


def result_base(problem: Problem, plan: Plan, loaded: LoadedSpec, x: Params, steps: int, began: float) -> dict[str, Any]:
    """The fields of result.json every run has, finished or not."""
    return {
        "name": problem.name,
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
        "upper_variables": plain(problem.upper.values(x)),  # hyperparameters in their declared units
        "resolved_spec": loaded.spec.model_dump(mode="json"),  # after --set: what reports compare runs by
    }


def finished_result(problem: Problem, engine: Engine, base: dict[str, Any], x: Params, y: Params, final_loss: float,
                    instance_losses: list[float] | None, out_dir: Path) -> dict[str, Any]:
    """result.json's report, per-instance results and fast-path report, added to ``base``."""
    out = dict(base)
    if problem.report is not None:
        out["report"] = plain(problem.report(problem.upper.view(tuple(p.detach() for p in x)), problem.lower.view(y),
                                             out_dir=out_dir))
    if problem.instance_batch and instance_losses is not None:  # the final loss is their sum; each one's here
        out["instances"] = problem.stacked.results(x, y, instance_losses, out_dir)
    execution = engine.execution_report()
    if execution is not None:
        out["fast_path"] = execution
    if problem.blocks is not None:  # a level of blocks: F is the blocks' mean
        sampler = problem.blocks
        out["blocks"] = {"count": sampler.count, "sample": sampler.sample, "order": sampler.order}
    if problem.resamples_tasks:  # meta-learning: the learned algorithm on fresh tasks
        out["meta_test"] = meta_test(problem, x)
    return out


def write_result(out_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "result.json", result)
