"""The `bilevel` command line: run | plan | validate | hypergrad | schema | engines | problems |
report | sweep | retrain.

Errors in a spec print one line per problem (file, dotted field path, what was expected) and exit
with code 2, without a traceback unless --debug is given. A run stopped by the NaN/inf guard
exits with code 3. Under torchrun (`torchrun --nproc_per_node N -m bilevel run SPEC`) every
process runs the command; only rank 0 prints results and the errors every rank shares.

Not split: one function per command, each a thin layer over the package's API; the commands
share their option declarations, output helpers and error handling (``_guard``), which typer
reads from one application."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from bilevel.presets import DEFAULT_PRESET, find_preset, list_presets
from bilevel.spec.errors import SpecError

__all__ = ["app", "main"]

app = typer.Typer(
    name="bilevel",
    help="Declarative bilevel optimization: declare the levels, the planner picks the hypergradient engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_debug = {"on": False}

SpecArg = typer.Argument(None, help="Spec file (.yaml/.json) or preset name (see `bilevel problems`).")
EngineOpt = typer.Option(None, "--engine", "-e", help="Engine kind, overriding the spec and the planner.")
DeviceOpt = typer.Option(None, "--device", help="cpu | cuda | auto (default: the spec's run.device).")
SetOpt = typer.Option(None, "--set", help="Override a spec field: dotted.path=value (YAML value). Repeatable.")


def _rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _echo(message: str) -> None:
    """Print a result: on rank 0 only."""
    if _rank() == 0:
        typer.echo(message)


def _err(message: str) -> None:
    """Print a message every rank would print alike (spec errors, warnings): on rank 0 only."""
    if _rank() == 0:
        typer.echo(message, err=True)


def _guard(fn: Callable[[], Any]) -> Any:
    from bilevel.runtime.loop import DivergenceError

    try:
        return fn()
    except SpecError as exc:
        for issue in exc.issues:
            _err(f"error: {issue}")
        if _debug["on"]:
            raise
        raise typer.Exit(2) from None
    except DivergenceError as exc:
        _err(f"diverged: {exc}")
        if _debug["on"]:
            raise
        raise typer.Exit(3) from None
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if _debug["on"]:
            raise
        where = f"[rank {_rank()}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        typer.echo(f"{where}error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None


def _load(spec: Optional[str], overrides: Optional[list[str]]) -> Any:
    from bilevel.spec.load import load_spec

    name = spec or DEFAULT_PRESET
    path = Path(name)
    if not path.exists():
        preset = find_preset(name)
        if preset is None:
            raise SpecError.single(name, "", f"no such file, and no preset of that name (presets: {', '.join(list_presets())})")
        path = preset
    return load_spec(path, overrides or [])


def _engine(kind: Optional[str], loaded: Any) -> Any:
    if kind is None:
        return None
    from bilevel.engines import engine_config, engine_kinds

    try:
        return engine_config(kind)
    except KeyError:
        raise SpecError.single("--engine", "engine", f"unknown engine {kind!r}; expected auto or one of: {', '.join(engine_kinds())}") from None


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    _debug["on"] = debug


@app.command()
def run(
    spec: Optional[str] = SpecArg,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the spec's run.out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in the output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard",
                                               help="Also write TensorBoard events to OUT/tensorboard (default: run.tensorboard)."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Run the outer loop; write result.json, metrics.jsonl and checkpoints. Without SPEC, runs the
    default preset (data hyper-cleaning on the digits data). Launched by torchrun with several
    processes, the run is data parallel (docs/howto/torchrun.md)."""
    from bilevel.runtime.loop import run as run_loop

    def go() -> None:
        loaded = _load(spec, overrides)
        result = run_loop(loaded, _engine(engine, loaded), device, out, resume, progress=not quiet, log=_err,
                          tensorboard=tensorboard)
        r = result.result
        processes = f"  processes: {r['world_size']}" if r.get("world_size", 1) > 1 else ""
        _echo(f"engine: {r['engine']}  steps: {r['steps']}  final upper loss: {r['final_upper_loss']:.6g}"
              f"  wall time: {r['wall_time_s']:.1f}s  device: {r['device']}{processes}")
        for key, value in (r.get("report") or {}).items():
            _echo(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        for item in r.get("instances") or []:  # a batch of instances: one line each
            figures = "  ".join(f"{k}: {v:.4f}" for k, v in (item.get("report") or {}).items() if isinstance(v, float))
            _echo(f"  instance {item['index']}: final upper loss {item['final_upper_loss']:.6g}  {figures}".rstrip())
        fast = r.get("fast_path")
        if fast and not (fast["requested"] == "auto" and r["device"] == "cpu"):  # CPU auto: plain eager, nothing to say
            _echo(f"fast path ({fast['requested']}): hypergradient {fast['hypergradient']}, inner loop {fast['inner_loop']}"
                       + "".join(f"\n  {reason}" for reason in fast["reasons"]))
        _echo(f"results in {result.out}/result.json")

    _guard(go)


@app.command()
def plan(
    spec: Optional[str] = SpecArg,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Print the engine the planner chooses and why."""
    from bilevel.compile import compile_spec
    from bilevel.planner import make_plan

    def go() -> None:
        loaded = _load(spec, overrides)
        the_plan = make_plan(compile_spec(loaded, device), _engine(engine, loaded))
        if as_json:
            typer.echo(json.dumps(the_plan.to_json(), indent=2))
            return
        typer.echo(f"engine: {the_plan.engine.kind}")
        typer.echo(f"config: {json.dumps(the_plan.engine.model_dump(mode='json'))}")
        typer.echo("why:")
        for reason in the_plan.reasons:
            typer.echo(f"  - {reason}")
        for warning in the_plan.warnings:
            typer.echo(f"warning: {warning}")

    _guard(go)


@app.command()
def validate(spec: Optional[str] = SpecArg, device: Optional[str] = DeviceOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Check a spec: schema, references to user code, a dry run of every objective, and the plan.
    Exits 0 when valid, 2 otherwise."""
    from bilevel.compile import compile_spec
    from bilevel.planner import make_plan

    def go() -> None:
        loaded = _load(spec, overrides)
        make_plan(compile_spec(loaded, device))
        typer.echo(f"{loaded.file}: valid")

    _guard(go)


@app.command()
def hypergrad(
    spec: Optional[str] = SpecArg,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Print the hypergradient at the upper variables' initial values (after the lower solve)."""
    from bilevel.runtime.loop import hypergrad_at_init

    def go() -> None:
        loaded = _load(spec, overrides)
        out = hypergrad_at_init(loaded, _engine(engine, loaded), device)
        if as_json:
            _echo(json.dumps(out))
            return
        _echo(f"engine: {out['engine']}  upper loss: {out['upper_loss']:.6g}")
        if not out["is_hypergradient"]:
            _echo(f"note: {out['engine']} is a single-loop method; this is its first search direction, not a hypergradient")
        for name, value in out["hypergradient"].items():
            _echo(f"  d upper / d {name}: {json.dumps(value)[:200]}")
        _echo(f"  stats: {json.dumps(out['stats'])}")

    _guard(go)


PluginOpt = typer.Option(None, "--plugin", help="Import a module or file that registers engines (as a spec's plugins). Repeatable.")


def _plugins(plugins: Optional[list[str]]) -> None:
    from bilevel.refs import RefError, import_module_ref

    for ref in plugins or []:
        try:
            import_module_ref(ref)
        except RefError as exc:
            raise SpecError.single("--plugin", ref, str(exc)) from None


@app.command()
def schema(out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to a file instead of stdout."),
           plugins: Optional[list[str]] = PluginOpt) -> None:
    """Export the JSON Schema of spec files (with the engines of any --plugin)."""
    from bilevel.spec.schema import spec_schema

    _guard(lambda: _plugins(plugins))
    text = json.dumps(spec_schema(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")


@app.command()
def engines(as_json: bool = typer.Option(False, "--json", help="Print as JSON."), plugins: Optional[list[str]] = PluginOpt) -> None:
    """List the registered engines (built in, from installed packages' entry points, or from
    --plugin modules) and what they assume."""
    from dataclasses import asdict

    from bilevel.engines import engine_class, engine_kinds

    _guard(lambda: _plugins(plugins))
    classes = {kind: engine_class(kind) for kind in engine_kinds()}
    if as_json:
        typer.echo(json.dumps({k: {**asdict(c.capabilities), "priority": c.priority, "module": c.__module__}
                               for k, c in classes.items()}, indent=2))
        return
    for kind, cls in classes.items():
        cap = cls.capabilities
        depth = "any" if cap.max_depth is None else str(cap.max_depth)
        typer.echo(f"{kind}: {cap.summary}")
        typer.echo(f"    lower level: {', '.join(cap.lower_convexity)}; memory: {cap.memory}; HVPs: {'yes' if cap.needs_hvp else 'no'};"
                   f" constraints: {'yes' if cap.handles_constraints else 'no'}; levels: {depth}; priority: {cls.priority}")


@app.command()
def problems(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the bundled problem presets (usable in place of a spec path)."""
    presets = list_presets()
    if as_json:
        typer.echo(json.dumps(presets, indent=2))
        return
    for name, info in presets.items():
        default = "  (default)" if name == DEFAULT_PRESET else ""
        typer.echo(f"{name}: {info['description']}{default}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (the --out of `bilevel run`), compared in this order."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Output directory (default: RUN_DIR/report for one run, <common parent>/report for several)."),
) -> None:
    """Plot the runs' upper loss, hypergradient norm, inner residual and hyperparameter / monitor
    trajectories (PNG), and write report.md comparing them (engine, steps, final upper loss, wall
    time, report values)."""
    from bilevel.reporting import ReportError, write_report

    def go() -> None:
        try:
            files = write_report(run_dirs, out)
        except ReportError as exc:
            _err(f"error: {exc}")
            raise typer.Exit(2) from None
        _echo(f"summary: {files.summary}")
        for path in files.plots:
            _echo(f"plot: {path}")

    _guard(go)


@app.command()
def sweep(
    target: str = typer.Argument(..., help="A sweep file (YAML with a `sweep:` section naming its spec), or a spec file / preset."),
    space: Optional[Path] = typer.Option(None, "--space", help="Sweep file with the `sweep:` section, when TARGET is a spec."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", min=1, help="Trials to add to the study (default: sweep.trials, 20)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL, e.g. sqlite:///study.db (default: OUT/study.db)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name: the same name resumes the study (default: sweep.study)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory of the trials' runs (default: runs/sweeps/STUDY)."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Search the settings a run cannot differentiate (engine, outer lr, inner steps, any spec
    field) with Optuna: one run directory per trial, pruning on the upper loss, the study in SQLite
    (rerun to add trials). See docs/howto/sweeps.md."""
    from bilevel.sweeps import prepare_sweep, run_sweep

    def go() -> None:
        plan = prepare_sweep(target, space, overrides or [], trials=trials, storage=storage, study=study,
                             out=None if out is None else str(out))
        searched = ", ".join(f"{d.name} -> {'.'.join(d.path)}" for d in plan.dimensions)
        _err(f"sweep {plan.sweep.study!r}: {plan.sweep.trials} trial(s) over {searched}; runs in {plan.out}")
        result = run_sweep(plan.sweep, plan.base, plan.dimensions, plan.out, say=_err)
        finished = [t for t in result.study.trials if t.state.name == "COMPLETE"]
        states: dict[str, int] = {}
        for t in result.study.trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        _echo(f"study {plan.sweep.study!r} in {result.storage}: {len(result.study.trials)} trials ("
              + ", ".join(f"{n} {state}" for state, n in states.items()) + ")")
        if finished:
            best = result.study.best_trial
            _echo(f"best: trial {best.number}  {plan.sweep.objective} = {best.value:.6g}  {json.dumps(best.params)}")
            _echo(f"  run directory: {best.user_attrs.get('run_dir')}")
        _echo(f"compare the trials: bilevel report {plan.out}/trial-*")

    _guard(go)


@app.command("meta-test")
def meta_test(
    run_dir: Path = typer.Argument(..., help="Output directory of a meta-learning run (a spec with tasks)."),
    tasks: Optional[int] = typer.Option(None, "--tasks", min=1, help="Meta-test tasks (default: the spec's tasks.test_tasks)."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Adaptation steps to score after, e.g. 0,1,10."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Adapt the learned meta-parameters to fresh tasks (the meta-test stream) with the trained
    algorithm, score them on their query sets, and print the mean, std and 95% confidence interval
    of each score per number of adaptation steps."""
    from bilevel.meta_test import meta_test_run

    def go() -> None:
        counts = None
        if steps is not None:
            try:
                counts = [int(part) for part in steps.split(",") if part.strip()]
            except ValueError:
                raise SpecError.single("--steps", "", f"expected comma-separated step counts such as 0,1,10, got {steps!r}") from None
        result = meta_test_run(run_dir, tasks, counts)
        if as_json:
            _echo(json.dumps(result))
            return
        _echo(f"meta-test of {run_dir} (step {result['step']}): {result['tasks']} tasks")
        for count, scores in result["steps"].items():
            figures = "  ".join(f"{name} {s['mean']:.4g} +- {s['ci95']:.2g} (std {s['std']:.3g})" for name, s in scores.items())
            _echo(f"  {count:>3} steps: {figures}")

    _guard(go)


@app.command()
def retrain(
    run_dir: Path = typer.Argument(..., help="Output directory of an architecture search (holds genotype.json)."),
    step: Optional[int] = typer.Option(None, "--step", help="Retrain the genotype the monitor wrote at this outer step."),
    genotype: Optional[Path] = typer.Option(None, "--genotype", help="Retrain this genotype file instead."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default: the spec's retrain.epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of the spec's retrain.schedule (cosine to 0 by default)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per step."),
    channels: Optional[int] = typer.Option(None, "--channels", help="Channels (conv) or width (mlp) of the network."),
    cells: Optional[int] = typer.Option(None, "--cells", help="Cells of the network."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the first training run."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Training runs from scratch (seeds seed, seed + 1, ...)."),
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a searched architecture from scratch, with the spec's retraining settings or others,
    and print its test accuracy; writes RUN_DIR/retrain.json (retrain-step-N.json with --step)."""
    from bilevel.nas.retrain import retrain_run

    overrides = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "channels": channels, "cells": cells,
                 "seed": seed, "repeats": repeats}

    def go() -> None:
        result = retrain_run(run_dir, step, genotype, overrides, device)
        if as_json:
            typer.echo(json.dumps(result))
            return
        spread = f" +- {result['test_accuracy_std']:.4f} over {len(result['test_accuracies'])} runs" if len(result["test_accuracies"]) > 1 else ""
        typer.echo(f"genotype: {result['genotype_file']}")
        for cell_type, edges in result["genotype"].items():
            if cell_type == "layers":  # a macro architecture: (kernel, width) per layer
                typer.echo("  layers: " + ", ".join(f"{k}x{k} conv {w} channels" for k, w in edges))
                continue
            typer.echo(f"  {cell_type}: " + ", ".join(f"{op} {s}->{d}" for op, s, d in edges))
        typer.echo(f"test accuracy: {result['test_accuracy']:.4f}{spread}  params: {result['params']}"
                   f"  epochs: {result['epochs']}  time: {result['time_s']:.1f}s")

    _guard(go)


def main() -> None:
    """Console entry point.

    Where a data-parallel run created a process group in this process (launched by torchrun
    with several processes), the process ends through ``bilevel.distributed.leave_process``:
    output flushed, then ``os._exit`` with the status the interpreter would have given (0, the
    command's exit code, or 1 after printing the traceback of an uncaught exception, as with
    --debug), because interpreter shutdown can abort a rank in gloo's C++ threads after the run
    finished, which torchrun reports as a failed job."""
    from bilevel.distributed import leave_process, process_group_was_created

    try:
        app()  # never returns: in standalone mode click ends even a successful command with SystemExit(0)
    except BaseException as exc:
        if not process_group_was_created():
            raise
        leave_process(_exit_status(exc))


def _exit_status(exc: BaseException) -> int:
    """The exit status the interpreter gives a process that ends by ``exc``, printing to stderr
    what it would print (a SystemExit's message, or the traceback of any other exception)."""
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    sys.excepthook(type(exc), exc, exc.__traceback__)
    return 1


if __name__ == "__main__":
    sys.exit(main())
