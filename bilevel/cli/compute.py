"""The commands that compute on a spec: run, plan, validate, hypergrad (bilevel.cli), and the
lines they print (the run summary's report values, the hypergradient's summary per tensor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from bilevel.cli.common import (
    DebugOpt,
    DeviceOpt,
    EngineOpt,
    SetOpt,
    SpecArg,
    ThreadsOpt,
    UsageProblem,
    command,
    echo,
    err,
    guard,
    load_spec_arg,
    references_of,
    rank,
)
from bilevel.reporting.numbers import format_mapping, format_number
from bilevel.reporting.optimum import batch_optimum_line

__all__ = ["MAX_INSTANCE_LINES", "gradient_summary", "hypergrad", "plan", "run", "validate"]

MAX_INSTANCE_LINES = 20
"""A batch of up to this many instances gets one summary line per instance; a larger one the first five."""


def _report_lines(report: dict[str, Any]) -> list[str]:
    """The run summary's lines for the problem's report values: numbers (and short lists of
    numbers) by format_number, the known-optimum verdict as a sentence, long lists and mappings
    only by their length."""
    from bilevel.reporting.optimum import KNOWN_OPTIMUM, optimum_line

    lines = []
    for key, value in report.items():
        if key == KNOWN_OPTIMUM:
            continue
        if isinstance(value, (int, float, bool)) or value is None:
            lines.append(f"  {key}: {format_number(value)}")
            continue
        if isinstance(value, list) and all(_is_number(v) for v in value):
            text = "[" + ", ".join(format_number(v) for v in value) + "]"
        elif isinstance(value, dict) and all(_is_number(v) for v in value.values()):
            text = "{" + ", ".join(f"{k}: {format_number(v)}" for k, v in value.items()) + "}"
        else:
            text = str(value)
        if isinstance(value, (list, dict)) and len(text) > 100:
            text = f"{type(value).__name__} of {len(value)} entries (in result.json)"
        lines.append(f"  {key}: {text}")
    verdict = optimum_line(report)
    if verdict is not None:
        lines.append(verdict)
    return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _threads_text(result: dict[str, Any]) -> str:
    threads = result.get("threads")
    return "" if threads is None or result.get("device") != "cpu" else f" ({threads} thread{'s' if threads != 1 else ''})"


@command(short_help="Run the outer loop of a spec or preset.")
def run(
    spec: Optional[str] = SpecArg,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="DIR", help="Output directory (default: the spec's run.out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in the output directory."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the run of a different spec that the output directory holds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", show_default=False,
                                               help="Also write TensorBoard events to OUT/tensorboard (default: run.tensorboard)."),
    mlflow: bool = typer.Option(False, "--mlflow", help="Also log to MLflow (the mlflow extra; MLFLOW_TRACKING_URI says where)."),
    wandb: bool = typer.Option(False, "--wandb", help="Also log to Weights & Biases (the wandb extra; WANDB_PROJECT, WANDB_MODE)."),
    overrides: Optional[list[str]] = SetOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
) -> None:
    """Run the outer loop; write result.json, metrics.jsonl and checkpoints. Without SPEC, run the
    default preset (data hyper-cleaning on the digits data). Launched by torchrun with several
    processes, the run is data parallel (docs/howto/torchrun.md)."""
    from bilevel.runtime.loop import run as run_loop
    from bilevel.runtime.trackers import TrackerUnavailable, open_trackers

    def go() -> None:
        loaded = load_spec_arg(spec, overrides, engine)
        out_dir = Path(out) if out is not None else Path(loaded.spec.run.out.replace("{name}", loaded.spec.name))
        try:
            trackers = open_trackers(loaded, out_dir, mlflow=mlflow, wandb=wandb) if rank() == 0 else None
        except TrackerUnavailable as exc:
            raise UsageProblem(str(exc)) from None
        try:
            result = run_loop(loaded, None, device, out, resume, progress=not quiet, log=err, tensorboard=tensorboard,
                              on_record=trackers.on_record if trackers else None, overwrite=overwrite)
        except BaseException as exc:
            if trackers:
                trackers.finish(None, interrupted=isinstance(exc, KeyboardInterrupt))
            raise
        if trackers:
            trackers.finish(result.result)
        r = result.result
        processes = f"  processes: {r['world_size']}" if r.get("world_size", 1) > 1 else ""
        echo(f"engine: {r['engine']}  steps: {r['steps']}  final upper loss: {format_number(r['final_upper_loss'])}"
              f"  wall time: {r['wall_time_s']:.1f}s  device: {r['device']}{_threads_text(r)}{processes}")
        for line in _report_lines(r.get("report") or {}):
            echo(line)
        items = r.get("instances") or []
        shown = items if len(items) <= MAX_INSTANCE_LINES else items[:5]
        for item in shown:  # a batch of instances: one line each (the first few of a large batch)
            figures = "  ".join(f"{k}: {format_number(v)}" for k, v in (item.get("report") or {}).items() if isinstance(v, float))
            echo(f"  instance {item['index']}: final upper loss {format_number(item['final_upper_loss'])}  {figures}".rstrip())
        if len(items) > len(shown):
            echo(f"  ... and {len(items) - len(shown)} more instances (in result.json)")
        verdict = batch_optimum_line([item.get("report") for item in items])
        if verdict is not None:
            echo(verdict)
        fast = r.get("fast_path")
        if fast and not (fast["requested"] == "auto" and r["device"] == "cpu"):  # CPU auto: plain eager, nothing to say
            echo(f"fast path ({fast['requested']}): hypergradient {fast['hypergradient']}, inner loop {fast['inner_loop']}"
                  + "".join(f"\n  {reason}" for reason in fast["reasons"]))
        echo(f"results in {result.out}/result.json")

    guard(go, debug, threads)


@command(short_help="Print the engine the planner chooses and why.")
def plan(
    spec: Optional[str] = SpecArg,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    overrides: Optional[list[str]] = SetOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
) -> None:
    """Print the engine the planner chooses for a spec and why."""
    from bilevel.compile import compile_spec
    from bilevel.planner import make_plan

    def go() -> None:
        loaded = load_spec_arg(spec, overrides, engine)
        the_plan = make_plan(compile_spec(loaded, device))
        if as_json:
            typer.echo(json.dumps(the_plan.to_json(), indent=2))
            return
        typer.echo(f"engine: {the_plan.engine.kind}")
        typer.echo(f"config: {json.dumps(the_plan.engine.model_dump(mode='json'))}")
        if the_plan.inner_solver is not None:
            chosen = the_plan.inner_solver
            predicted = ", extrapolate" if chosen.extrapolate else ""
            typer.echo(f"inner solver: {chosen.name} (steps {chosen.steps}, tol {chosen.tol}, check_every {chosen.check_every}"
                       f"{predicted})")
        typer.echo("why:")
        for reason in the_plan.reasons:
            typer.echo(f"  - {reason}")
        for warning in the_plan.warnings:
            typer.echo(f"warning: {warning}")

    guard(go, debug, threads)


@command(short_help="Check a spec; exit 0 when valid, 2 otherwise.")
def validate(
    spec: Optional[str] = SpecArg,
    device: Optional[str] = DeviceOpt,
    overrides: Optional[list[str]] = SetOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
) -> None:
    """Check a spec: schema, references to user code, a dry run of every objective, and the plan.
    Exits 0 when valid, 2 otherwise. Under --allow-imports, first lists every reference the spec
    would import (and refuses those the list excludes before importing any)."""
    from bilevel.compile import compile_spec
    from bilevel.planner import make_plan
    from bilevel.refs import allowed_imports

    def go() -> None:
        if allowed_imports() is not None:  # under an allow list: what the spec would import, before anything is
            for path, ref in references_of(spec):
                err(f"imports: {path}: {ref}")
        loaded = load_spec_arg(spec, overrides)
        make_plan(compile_spec(loaded, device))
        typer.echo(f"{loaded.file}: valid")

    guard(go, debug, threads)


def _flat_gradients(name: str, value: Any) -> list[tuple[str, Any]]:
    """(name, nested list) per tensor of a hypergradient entry (a module variable's is a dict of
    its parameters)."""
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in _flat_gradients(f"{name}.{key}", inner)]
    return [(name, value)]


def _shape_and_entries(value: Any) -> tuple[list[int], list[float]]:
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    entries: list[float] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            entries.append(float(item))
    return shape, entries


def gradient_summary(name: str, value: Any, shown: int = 5) -> str:
    """One line about a hypergradient tensor (nested lists): its shape, norm, largest entry and
    first entries, each number whole (format_number)."""
    shape, entries = _shape_and_entries(value)
    if not shape:
        return f"d upper / d {name}: {format_number(entries[0])}"
    norm = sum(e * e for e in entries) ** 0.5
    largest = max((abs(e) for e in entries), default=0.0)
    first = " ".join(format_number(e) for e in entries[:shown]) + (" ..." if len(entries) > shown else "")
    return (f"d upper / d {name}: shape {shape}, norm {format_number(norm)}, max |entry| {format_number(largest)};"
            f" first: {first}")


@command(short_help="Print the hypergradient at the initial upper variables.")
def hypergrad(
    spec: Optional[str] = SpecArg,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, with every entry of the hypergradient."),
    overrides: Optional[list[str]] = SetOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
) -> None:
    """Print the hypergradient at the upper variables' initial values (after the lower solve):
    a summary per variable, or everything with --json."""
    from bilevel.runtime.loop import hypergrad_at_init

    def go() -> None:
        loaded = load_spec_arg(spec, overrides, engine)
        out = hypergrad_at_init(loaded, None, device)
        if as_json:
            echo(json.dumps(out))
            return
        echo(f"engine: {out['engine']}  upper loss: {format_number(out['upper_loss'])}")
        if not out["is_hypergradient"]:
            echo(f"note: {out['engine']} is a single-loop method; this is its first search direction, not a hypergradient")
        for name, value in out["hypergradient"].items():
            for tensor, nested in _flat_gradients(name, value):
                echo(f"  {gradient_summary(tensor, nested)}")
        echo(f"  stats: {format_mapping(out['stats'])}")

    guard(go, debug, threads)
