"""Meta-test: adapt the learned algorithm to fresh tasks and score it on their query sets.

For a meta-learning problem (``tasks`` in the spec) and upper variables x (the meta-parameters),
each test task i starts its lower variables where training starts them (``init_from``: at x;
otherwise at their initial values), takes s steps of the lower level's own solver on its support
set (with its tuned learning rates, e.g. Meta-SGD's, and its prox term, e.g. iMAML's), and is
scored by the upper objective on its query set; for s in the requested step counts this gives
per-task losses L_i(s) (and the spec's ``tasks.metrics``, e.g. accuracy), summarized as

    mean, standard deviation (n - 1 in the denominator), 95% CI = 1.96 std / sqrt(n),

over n tasks drawn from the meta-test stream (seed ``tasks.seed + TEST_SEED_OFFSET``, the
``test_sampler`` or the sampler with ``test_kwargs``): the protocol of Finn et al. 2017 (600 tasks).

The meta-test runs in the calling process alone (``bilevel.distributed.alone``): in a
data-parallel run rank 0 evaluates every test task, with no collective and no split of the
meta-batch, while the other ranks wait for its result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bilevel.compile import compile_spec
from bilevel.distributed.reduce import alone
from bilevel.engines.inner import solve_lower
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.problem.tasks import TEST_SEED_OFFSET, TaskStream
from bilevel.runtime.atomic import load_checkpoint
from bilevel.runtime.spec_record import load_spec_record

__all__ = ["meta_test", "meta_test_run", "summarize"]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, std (n - 1) and the half-width of a normal 95% confidence interval of the mean."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(n), "n": n}


def meta_test(problem: Problem, x: Params, tasks: int | None = None, steps: Sequence[int] | None = None) -> dict[str, Any]:
    """Per-step summaries of the query loss (and metrics) over ``tasks`` meta-test tasks, in this
    process alone (see the module docstring)."""
    if not problem.resamples_tasks:
        raise ValueError(f"{problem.name!r} declares no tasks: meta-test applies to meta-learning problems")
    with alone():
        return _meta_test(problem, x, tasks, steps)


def _meta_test(problem: Problem, x: Params, tasks: int | None, steps: Sequence[int] | None) -> dict[str, Any]:
    setup = problem.stacked.tasks
    lower = problem.lower
    n_tasks = tasks or setup.test_tasks
    counts = sorted(set(steps if steps is not None else (setup.test_steps or (0, 1, lower.solver.steps))))
    stream = TaskStream(setup.test_sampler, setup.test_kwargs, setup.meta_batch, setup.seed + TEST_SEED_OFFSET,
                        problem.device, problem.dtype, "tasks.test_sampler")
    optimizer = InnerOptimizer(lower.solver)
    xd = tuple(p.detach() for p in x)
    scores: dict[int, dict[str, list[float]]] = {s: {} for s in counts}
    seen = 0
    while seen < n_tasks:
        batch = stream.sample()
        keep = min(setup.meta_batch, n_tasks - seen)
        y = problem.initial_lower(xd)
        state = optimizer.init(y)
        done = 0
        for s in counts:
            y, state = solve_lower(problem, optimizer, xd, y, state, batches=[batch["support"]] * (s - done))
            done = s
            for name, values in _scores(problem, setup, xd, y, batch["query"]).items():
                scores[s].setdefault(name, []).extend(values[:keep])
        seen += keep
    return {"tasks": n_tasks, "steps": {str(s): {name: summarize(values) for name, values in by_name.items()}
                                        for s, by_name in scores.items()}}


def _scores(problem: Problem, setup: Any, x: Params, y: Params, query: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per task: the upper objective on its query set, and the spec's metrics."""
    with torch.no_grad():
        out = {"query_loss": problem.stacked.per_instance(0, [x, y], query).tolist()}
        if setup.metrics is not None:
            template = problem.stacked.template
            per_task: dict[str, list[float]] = {}
            for i in range(problem.instances or 0):
                values = setup.metrics(template.upper.view(x), template.lower.view(tuple(p[i] for p in y)),
                                       {k: v[i] for k, v in query.items()})
                for name, value in values.items():
                    per_task.setdefault(name, []).append(float(value))
            out.update(per_task)
    return out


def meta_test_run(run_dir: str | Path, tasks: int | None = None, steps: Sequence[int] | None = None) -> dict[str, Any]:
    """The meta-test of a finished (or checkpointed) run: its spec from ``run_dir/spec.json``,
    its meta-parameters from the checkpoint."""
    run_dir = Path(run_dir)
    loaded = load_spec_record(run_dir)
    problem = compile_spec(loaded, "cpu" if not torch.cuda.is_available() else None)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint.pt: nothing to meta-test")
    x = tuple(t.to(problem.device, problem.dtype) for t in checkpoint["x"])
    return {"step": int(checkpoint["step"]), **meta_test(problem, x, tasks, steps)}
