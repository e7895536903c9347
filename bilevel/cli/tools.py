"""The commands around runs: schema, engines, problems, report, sweep, meta-test, retrain
(bilevel.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from bilevel.cli.common import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    PluginOpt,
    SetOpt,
    ThreadsOpt,
    command,
    echo,
    err,
    guard,
    import_plugins,
)
from bilevel.presets import DEFAULT_PRESET, list_presets
from bilevel.reporting.numbers import format_number
from bilevel.spec.errors import SpecError

__all__ = ["engines", "meta_test", "problems", "report", "retrain", "schema", "sweep"]


@command(short_help="Export the JSON Schema of spec files.")
def schema(
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="Write to a file instead of standard output."),
    plugins: Optional[list[str]] = PluginOpt,
    debug: bool = DebugOpt,
) -> None:
    """Export the JSON Schema of spec files (with the engines of any --plugin)."""
    from bilevel.spec.schema import spec_schema

    def go() -> None:
        import_plugins(plugins)
        text = json.dumps(spec_schema(), indent=2)
        if out is None:
            typer.echo(text)
        else:
            out.write_text(text + "\n")

    guard(go, debug, compute=False)


@command(short_help="List the registered engines and what they assume.")
def engines(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    plugins: Optional[list[str]] = PluginOpt,
    debug: bool = DebugOpt,
) -> None:
    """List the registered engines (built in, from installed packages' entry points, or from
    --plugin modules) and what they assume."""
    from dataclasses import asdict

    from bilevel.engines import engine_class, engine_kinds

    def go() -> None:
        import_plugins(plugins)
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

    guard(go, debug, compute=False)


@command(short_help="List the bundled problem presets.")
def problems(as_json: bool = typer.Option(False, "--json", help="Print as JSON."), debug: bool = DebugOpt) -> None:
    """List the bundled problem presets (usable in place of a spec path)."""

    def go() -> None:
        presets = list_presets()
        if as_json:
            typer.echo(json.dumps(presets, indent=2))
            return
        for name, info in presets.items():
            default = "  (default)" if name == DEFAULT_PRESET else ""
            typer.echo(f"{name}: {info['description']}{default}")

    guard(go, debug, compute=False)


@command(short_help="Compare runs: figures, report.md, CSV tables.")
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", show_default=False,
                                          help="Run directories (the --out of `bilevel run`), compared in this order;"
                                               " a directory holding run directories (a sweep's) stands for them."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR",
                                       help="Output directory (default: RUN_DIR/report for one run, <common parent>/report for several)."),
    csv: bool = typer.Option(False, "--csv", help="Also write runs.csv (one row per run, or per instance),"
                                                  " metrics.csv (one row per logged step) and aggregate.csv."),
    debug: bool = DebugOpt,
) -> None:
    """Compare runs: figures of the upper loss, hypergradient norm and residuals against the outer
    step and the wall-clock time, of the hyperparameter and monitor trajectories, and report.md
    (engine, steps, final upper loss, wall time, report values, sweep parameters, mean +- std and
    95% confidence intervals across seeds, instances and trials)."""
    from bilevel.reporting import ReportError, write_report

    def go() -> None:
        try:
            files = write_report(run_dirs, out, csv=csv)
        except ReportError as exc:
            err(f"error: {exc}")
            raise typer.Exit(2) from None
        for note in files.warnings:
            err(f"warning: {note}")
        echo(f"summary: {files.summary}")
        for path in files.plots:
            echo(f"figure: {path}")
        for path in files.tables:
            echo(f"table: {path}")

    guard(go, debug, compute=False)


@command(short_help="Search engine, learning rates or any field with Optuna.")
def sweep(
    target: str = typer.Argument(..., metavar="SWEEP_OR_SPEC", show_default=False,
                                 help="A sweep file (YAML with a `sweep:` section naming its spec), or a spec file / preset."),
    space: Optional[Path] = typer.Option(None, "--space", metavar="FILE", help="Sweep file with the `sweep:` section, when the target is a spec."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", min=1, metavar="N", help="Trials to add to the study (default: sweep.trials, 20)."),
    storage: Optional[str] = typer.Option(None, "--storage", metavar="URL", help="Optuna storage URL, e.g. sqlite:///study.db (default: OUT/study.db)."),
    study: Optional[str] = typer.Option(None, "--study", metavar="NAME", help="Study name: the same name resumes the study (default: sweep.study)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Directory of the trials' runs (default: runs/sweeps/STUDY)."),
    overrides: Optional[list[str]] = SetOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
) -> None:
    """Search the settings a run cannot differentiate (engine, outer lr, inner steps, any spec
    field) with Optuna: one run directory per trial, pruning on the upper loss, the study in SQLite
    (rerun to add trials). Ctrl-C marks the running trial interrupted and exits with code 130.
    See docs/howto/sweeps.md."""
    from bilevel.sweeps import SweepInterrupted, prepare_sweep, run_sweep, trial_states

    def go() -> None:
        plan = prepare_sweep(target, space, overrides or [], trials=trials, storage=storage, study=study,
                             out=None if out is None else str(out))
        searched = ", ".join(f"{d.name} -> {'.'.join(d.path)}" for d in plan.dimensions)
        err(f"sweep {plan.sweep.study!r}: {plan.sweep.trials} trial(s) over {searched}; runs in {plan.out}")
        try:
            result = run_sweep(plan.sweep, plan.base, plan.dimensions, plan.out, say=err)
        except SweepInterrupted as stop:
            err(f"interrupted: {stop}")
            raise typer.Exit(130) from None
        states = trial_states(result.study)
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        echo(f"study {plan.sweep.study!r} in {result.storage}: {len(states)} trials ("
              + ", ".join(f"{n} {state}" for state, n in counts.items()) + ")")
        if any(state == "complete" for state in states.values()):
            best = result.study.best_trial
            params = "  ".join(f"{k}={format_number(v)}" for k, v in best.params.items())
            echo(f"best: trial {best.number}  {plan.sweep.objective} = {format_number(best.value)}  {params}")
            echo(f"  run directory: {best.user_attrs.get('run_dir')}")
        echo(f"compare the trials: bilevel report {plan.out}")

    guard(go, debug, threads)


@command("meta-test", short_help="Score a meta-learning run's learned algorithm on fresh tasks.")
def meta_test(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                   help="Output directory of a meta-learning run (a spec with tasks)."),
    tasks: Optional[int] = typer.Option(None, "--tasks", min=1, metavar="N", help="Meta-test tasks (default: the spec's tasks.test_tasks)."),
    steps: Optional[str] = typer.Option(None, "--steps", metavar="S,S,...", help="Adaptation steps to score after, e.g. 0,1,10."),
    as_json: bool = JsonOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
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
            echo(json.dumps(result))
            return
        echo(f"meta-test of {run_dir} (step {result['step']}): {result['tasks']} tasks")
        for count, scores in result["steps"].items():
            figures = "  ".join(f"{name} {s['mean']:.4g} +- {s['ci95']:.2g} (std {s['std']:.3g})" for name, s in scores.items())
            echo(f"  {count:>3} steps: {figures}")

    guard(go, debug, threads)


@command(short_help="Train a searched architecture from scratch.")
def retrain(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                   help="Output directory of an architecture search (holds genotype.json)."),
    step: Optional[int] = typer.Option(None, "--step", metavar="N", help="Retrain the genotype the monitor wrote at this outer step."),
    genotype: Optional[Path] = typer.Option(None, "--genotype", metavar="FILE", help="Retrain this genotype file instead."),
    epochs: Optional[int] = typer.Option(None, "--epochs", metavar="N", help="Training epochs (default: the spec's retrain.epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="LR", help="Peak learning rate of the spec's retrain.schedule (cosine to 0 by default)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", help="Examples per step."),
    channels: Optional[int] = typer.Option(None, "--channels", metavar="C", help="Channels (conv) or width (mlp) of the network."),
    cells: Optional[int] = typer.Option(None, "--cells", metavar="N", help="Cells of the network."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="SEED", help="Seed of the first training run."),
    repeats: Optional[int] = typer.Option(None, "--repeats", metavar="R", help="Training runs from scratch (seeds SEED, SEED + 1, ...)."),
    device: Optional[str] = DeviceOpt,
    as_json: bool = JsonOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
) -> None:
    """Train a searched architecture from scratch, with the spec's retraining settings or others,
    and print its test accuracy. Each retraining writes a new file, RUN_DIR/retrains/retrain-NNN.json;
    none replaces another (nor the search's own retrain.json)."""
    from bilevel.nas.retrain import retrain_run

    overrides = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "channels": channels, "cells": cells,
                 "seed": seed, "repeats": repeats}

    def go() -> None:
        result = retrain_run(run_dir, step, genotype, overrides, device)
        if as_json:
            typer.echo(json.dumps(result))
            return
        runs = len(result["test_accuracies"])
        spread = f" +- {format_number(result['test_accuracy_std'])} over {runs} runs" if runs > 1 else ""
        typer.echo(f"genotype: {result['genotype_file']}")
        for cell_type, edges in result["genotype"].items():
            if cell_type == "layers":  # a macro architecture: (kernel, width) per layer
                typer.echo("  layers: " + ", ".join(f"{k}x{k} conv {w} channels" for k, w in edges))
                continue
            typer.echo(f"  {cell_type}: " + ", ".join(f"{op} {s}->{d}" for op, s, d in edges))
        typer.echo(f"test accuracy: {format_number(result['test_accuracy'])}{spread}  params: {result['params']}"
                   f"  epochs: {result['epochs']}  time: {result['time_s']:.1f}s")
        typer.echo(f"written: {result['file']}")

    guard(go, debug, threads)
