"""Compile a validated spec into a Problem: resolve user code, load data, build variables on the
device, and check by a dry run that every objective can be called and returns a scalar.

One path for every spec:

    spec --(instances / blocks: one spec per instance / block)--> compile each: levels -> checks -> dry run
         --(instances: bilevel.problem.stack; blocks: bilevel.problem.blocks)--> Problem

* :mod:`~bilevel.compile.issues`: the issues found, and references to user code;
* :mod:`~bilevel.compile.levels`: one level's variables, objective, data, constraints;
* :mod:`~bilevel.compile.checks`: the chain, solvers and tuned hyperparameters;
* :mod:`~bilevel.compile.dry_run`: every objective at the initial variables;
* :mod:`~bilevel.compile.instances`: the specs of a batch of instances;
* :mod:`~bilevel.compile.blocks`: a lower level of blocks."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import torch

from bilevel.compile.blocks import blocks_of, compile_blocks
from bilevel.compile.checks import structure_issues, task_issues
from bilevel.compile.couplings import couple_levels
from bilevel.compile.data_order import wire_data_order
from bilevel.compile.dry_run import dry_run
from bilevel.compile.instances import instance_specs
from bilevel.compile.issues import IssueLog
from bilevel.compile.levels import LevelBuilder
from bilevel.compile.prox import check_no_prox_with_instances, prox_issues
from bilevel.problem import Level, Problem, stack
from bilevel.problem.tasks import TaskSetup, TaskStream, check_task_batch, stack_tasks
from bilevel.spec.errors import SpecError
from bilevel.spec.load import LoadedSpec
from bilevel.spec.problem import BilevelSpec

__all__ = ["compile_spec", "resolve_device", "spec_fingerprint"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_RUN_ONLY = ("steps", "out", "checkpoint_every", "log_every", "monitor_every", "tensorboard", "distributed")
"""run settings that change how long a run goes and what it writes, not what it computes."""


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SpecError.single("--device", "run.device", f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    return device


def spec_fingerprint(spec: BilevelSpec) -> str:
    """A digest of the spec without the run settings in ``_RUN_ONLY``: two specs with the same
    fingerprint compute the same run, so a checkpoint of one resumes the other."""
    data = spec.model_dump(mode="json")
    for key in _RUN_ONLY:
        data["run"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def compile_spec(loaded: LoadedSpec | BilevelSpec, device: str | torch.device | None = None) -> Problem:
    """Build the Problem a spec describes, on ``device`` (default: the spec's run.device).

    Raises SpecError with one issue per problem found (missing callables, wrong signatures,
    data of the wrong form, shapes that make an objective fail at the initial point). A spec
    with ``instances`` gives the stacked problem of its instances."""
    if isinstance(loaded, BilevelSpec):
        loaded = LoadedSpec(loaded)
    fingerprint = spec_fingerprint(loaded.spec)
    if blocks_of(loaded) is not None:
        return compile_blocks(loaded, lambda one: _compile_one(one, device, fingerprint))
    if loaded.spec.instances is None:
        return _compile_one(loaded, device, fingerprint)
    check_no_prox_with_instances(loaded)
    members = [_compile_one(one, device, fingerprint) for one in instance_specs(loaded)]
    return stack(members, loaded.spec.instances.vary)


def _compile_one(loaded: LoadedSpec, device: str | torch.device | None, fingerprint: str) -> Problem:
    spec = loaded.spec
    source = loaded.source
    dev = resolve_device(str(device) if device is not None else spec.run.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise source.error("run.device", "cuda was requested but no CUDA device is available (use cpu or auto)")
    log = IssueLog(source, loaded.base_dir)
    builder = LevelBuilder(spec, log, dev, _DTYPES[spec.run.dtype])
    torch.manual_seed(spec.run.seed)
    levels: dict[str, Level] = {}
    for offset, (name, level_spec) in enumerate(spec.levels.items()):
        level = builder.level(name, level_spec, spec.run.seed + 1000 * (offset + 1))
        if level is not None:
            levels[name] = level
    report, monitor = _report(log, spec), _monitor(log, spec)
    log.raise_any()
    levels = couple_levels(log, levels, spec.levels)
    log.raise_any()
    problem = Problem(spec.name, levels, dev, builder.dtype, report, monitor, source=source,
                      memory_budget_mb=spec.run.budget.memory_mb, engine=spec.engine, fingerprint=fingerprint)
    issues = structure_issues(problem) + task_issues(problem, spec) + prox_issues(spec, problem) + wire_data_order(problem)
    if issues:
        raise SpecError(issues)
    if spec.tasks is not None:
        problem = _with_tasks(log, problem, spec)
    dry_run(log, problem, spec.levels)
    log.raise_any()
    return problem


def _with_tasks(log: IssueLog, problem: Problem, spec: BilevelSpec) -> Problem:
    """The meta-batch problem of a spec with ``tasks`` (bilevel.problem.tasks), its sampler tried
    once so that a sampler that fails or returns the wrong form is a spec error."""
    tasks = spec.tasks
    assert tasks is not None
    sampler = log.ref(tasks.sampler, "tasks.sampler")
    test_sampler = log.ref(tasks.test_sampler, "tasks.test_sampler") if tasks.test_sampler is not None else sampler
    metrics = log.ref(tasks.metrics, "tasks.metrics") if tasks.metrics is not None else None
    log.raise_any()
    stream = TaskStream(sampler, tasks.kwargs, tasks.meta_batch, tasks.seed, problem.device, problem.dtype)
    try:
        raw = sampler(tasks.meta_batch, torch.Generator().manual_seed(tasks.seed), **tasks.kwargs)
    except Exception as exc:  # user code
        log.fail_call(exc, tasks.sampler, "tasks.sampler", "tasks.kwargs")
        log.raise_any()
    problem_text = check_task_batch(raw, tasks.meta_batch, tasks.sampler)
    if problem_text is not None:
        raise problem.source.error("tasks.sampler", problem_text)
    setup = TaskSetup(sampler, tasks.kwargs, tasks.meta_batch, tasks.seed, tasks.reduce, test_sampler,
                      {**tasks.kwargs, **tasks.test_kwargs}, tasks.test_tasks,
                      None if tasks.test_steps is None else tuple(tasks.test_steps), metrics)
    return stack_tasks(problem, stream, setup, problem.source)


def _names_parameter(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _report(log: IssueLog, spec: BilevelSpec) -> Callable[..., Any] | None:
    """The report called as report(upper, lower, out_dir=...): out_dir is passed on only to a
    function that names it among its parameters."""
    if spec.report is None:
        return None
    fn = log.ref(spec.report, "report")
    if fn is None:
        return None
    wants_dir = _names_parameter(fn, "out_dir")
    extra = {"out_dir": None} if wants_dir else {}
    if log.bind(fn, 2, {**extra, **spec.report_kwargs}, "report", "f(upper, lower)") is None:
        return None
    log.check_annotated_kwargs(fn, spec.report_kwargs, spec.report, "report_kwargs")
    kwargs = spec.report_kwargs
    if wants_dir:
        return lambda upper, lower, out_dir=None: fn(upper, lower, out_dir=out_dir, **kwargs)
    return lambda upper, lower, out_dir=None: fn(upper, lower, **kwargs)


def _monitor(log: IssueLog, spec: BilevelSpec) -> Callable[..., Any] | None:
    """The monitor, called as monitor(upper, lower, step=..., out_dir=...)."""
    if spec.monitor is None:
        return None
    fn = log.ref(spec.monitor, "monitor")
    if fn is None:
        return None
    if log.bind(fn, 2, {"step": 0, "out_dir": None, **spec.monitor_kwargs}, "monitor", "f(upper, lower, *, step, out_dir)") is None:
        return None
    log.check_annotated_kwargs(fn, spec.monitor_kwargs, spec.monitor, "monitor_kwargs")
    return functools.partial(fn, **spec.monitor_kwargs) if spec.monitor_kwargs else fn
