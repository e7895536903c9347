"""The `bilevel` command line: run | plan | validate | hypergrad | schema | engines | problems |
report | sweep | retrain.

Errors in a spec print one line per problem (file, dotted field path, what was expected) and exit
with code 2, without a traceback unless --debug is given (before or after the command's name). A
run stopped by the NaN/inf guard exits with code 3, an interrupted one (Ctrl-C) with 130, and a
command whose output pipe was closed early (``bilevel plan | head -1``) stops quietly with 141.
Commands that compute use one CPU thread unless --threads or OMP_NUM_THREADS says otherwise
(bilevel.runtime.threads). Under torchrun (`torchrun --nproc_per_node N -m bilevel run SPEC`)
every process runs the command; only rank 0 prints results and the errors every rank shares."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core

from bilevel.presets import DEFAULT_PRESET, find_preset, list_presets
from bilevel.reporting.numbers import format_mapping, format_number
from bilevel.spec.errors import SpecError

__all__ = ["BROKEN_PIPE_EXIT", "UsageProblem", "app", "gradient_summary", "main"]

BROKEN_PIPE_EXIT = 141
"""Exit status when standard output is closed early (128 + SIGPIPE, as for other Unix tools)."""

app = typer.Typer(
    name="bilevel",
    help="Declarative bilevel optimization: declare the levels, the planner picks the hypergradient engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no "<bool>" metavars, no descriptions wrapped into narrow columns
)


class _Command(typer.core.TyperCommand):
    """A command whose help reads like a man page: arguments by their metavar (``RUN_DIR``,
    ``[SPEC]``), never typer's ``{run_dir}`` or ``<str>``; options as click shows them."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["rich_markup_mode"] = None  # click's plain formatter, which the methods below feed
        super().__init__(*args, **kwargs)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        params = self.get_params(ctx)
        pieces = ["[OPTIONS]"] if any(p.param_type_name == "option" for p in params) else []
        for param in params:
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        params = self.get_params(ctx)
        arguments = [(_argument_name(p), getattr(p, "help", None) or "") for p in params if p.param_type_name == "argument"]
        options = [record for p in params if p.param_type_name == "option"
                   for record in [p.get_help_record(ctx)] if record is not None]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(param: Any) -> str:
    name = param.metavar or (param.name or "").upper()
    return name if param.nargs == 1 or name.endswith("...") else f"{name}..."


_debug = {"on": False}
_root_threads: dict[str, Optional[int]] = {"threads": None}

SpecArg = typer.Argument(None, metavar="SPEC", show_default=False,
                         help="Spec file (.yaml/.json) or preset name (see `bilevel problems`); default: hyperclean/digits.")
EngineOpt = typer.Option(None, "--engine", "-e", metavar="KIND", help="Engine kind, overriding the spec and the planner.")
DeviceOpt = typer.Option(None, "--device", metavar="DEVICE", help="cpu, cuda or auto (default: the spec's run.device).")
SetOpt = typer.Option(None, "--set", metavar="PATH=VALUE",
                      help="Override a spec field: dotted.path=value, the value parsed as YAML. Repeatable.")
DebugOpt = typer.Option(False, "--debug", help="Show the traceback of an error.")
ThreadsOpt = typer.Option(None, "--threads", metavar="N", show_default=False,
                          help="CPU threads of torch's operators (default: 1, or what OMP_NUM_THREADS says).")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")


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


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that flushing what is left at exit cannot raise
    BrokenPipeError again (the recipe of Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (a test runner's buffer)
        pass


class UsageProblem(Exception):
    """A command line that cannot be carried out as given (an option whose package is missing,
    a bad BILEVEL_THREADS): printed as ``error: MESSAGE``, exit code 2."""


def _guard(fn: Callable[[], Any], debug: bool = False, threads: Optional[int] = None, compute: bool = True) -> Any:
    """Run a command's body: apply --debug and the thread setting (``compute``), and turn errors
    into messages and exit codes (module docstring)."""
    from bilevel.runtime.loop import DivergenceError

    _debug["on"] = _debug["on"] or debug
    try:
        if compute:
            from bilevel.runtime.threads import configure_threads

            try:
                configure_threads(threads if threads is not None else _root_threads["threads"])
            except ValueError as exc:
                raise UsageProblem(str(exc)) from None
        return fn()
    except UsageProblem as exc:
        _err(f"error: {exc}")
        if _debug["on"]:
            raise
        raise typer.Exit(2) from None
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
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(BROKEN_PIPE_EXIT) from None
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
    from pydantic import TypeAdapter, ValidationError

    from bilevel.spec.engine import EngineSpec

    try:
        return TypeAdapter(EngineSpec).validate_python({"kind": kind})
    except ValidationError:
        from bilevel.engines import engine_kinds

        raise SpecError.single("--engine", "engine", f"unknown engine {kind!r}; expected auto or one of: {', '.join(engine_kinds())}") from None


@app.callback()
def _root(debug: bool = DebugOpt, threads: Optional[int] = ThreadsOpt) -> None:
    """Declarative bilevel optimization: declare the levels, the planner picks the hypergradient engine."""
    _debug["on"] = debug
    _root_threads["threads"] = threads


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


@app.command(cls=_Command, short_help="Run the outer loop of a spec or preset.")
def run(
    spec: Optional[str] = SpecArg,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Output directory (default: the spec's run.out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in the output directory."),
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
        loaded = _load(spec, overrides)
        out_dir = out if out is not None else Path(loaded.spec.run.out)
        try:
            trackers = open_trackers(loaded, out_dir, mlflow=mlflow, wandb=wandb) if _rank() == 0 else None
        except TrackerUnavailable as exc:
            raise UsageProblem(str(exc)) from None
        try:
            result = run_loop(loaded, _engine(engine, loaded), device, out, resume, progress=not quiet, log=_err,
                              tensorboard=tensorboard, on_record=trackers.on_record if trackers else None)
        except BaseException as exc:
            if trackers:
                trackers.finish(None, interrupted=isinstance(exc, KeyboardInterrupt))
            raise
        if trackers:
            trackers.finish(result.result)
        r = result.result
        processes = f"  processes: {r['world_size']}" if r.get("world_size", 1) > 1 else ""
        _echo(f"engine: {r['engine']}  steps: {r['steps']}  final upper loss: {format_number(r['final_upper_loss'])}"
              f"  wall time: {r['wall_time_s']:.1f}s  device: {r['device']}{_threads_text(r)}{processes}")
        for line in _report_lines(r.get("report") or {}):
            _echo(line)
        for item in r.get("instances") or []:  # a batch of instances: one line each
            figures = "  ".join(f"{k}: {format_number(v)}" for k, v in (item.get("report") or {}).items() if isinstance(v, float))
            _echo(f"  instance {item['index']}: final upper loss {format_number(item['final_upper_loss'])}  {figures}".rstrip())
        fast = r.get("fast_path")
        if fast and not (fast["requested"] == "auto" and r["device"] == "cpu"):  # CPU auto: plain eager, nothing to say
            _echo(f"fast path ({fast['requested']}): hypergradient {fast['hypergradient']}, inner loop {fast['inner_loop']}"
                  + "".join(f"\n  {reason}" for reason in fast["reasons"]))
        _echo(f"results in {result.out}/result.json")

    _guard(go, debug, threads)


@app.command(cls=_Command, short_help="Print the engine the planner chooses and why.")
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
        loaded = _load(spec, overrides)
        the_plan = make_plan(loaded, compile_spec(loaded, device), _engine(engine, loaded))
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

    _guard(go, debug, threads)


@app.command(cls=_Command, short_help="Check a spec; exit 0 when valid, 2 otherwise.")
def validate(
    spec: Optional[str] = SpecArg,
    device: Optional[str] = DeviceOpt,
    overrides: Optional[list[str]] = SetOpt,
    threads: Optional[int] = ThreadsOpt,
    debug: bool = DebugOpt,
) -> None:
    """Check a spec: schema, references to user code, a dry run of every objective, and the plan.
    Exits 0 when valid, 2 otherwise."""
    from bilevel.compile import compile_spec
    from bilevel.planner import make_plan

    def go() -> None:
        loaded = _load(spec, overrides)
        make_plan(loaded, compile_spec(loaded, device))
        typer.echo(f"{loaded.file}: valid")

    _guard(go, debug, threads)


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


@app.command(cls=_Command, short_help="Print the hypergradient at the initial upper variables.")
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
        loaded = _load(spec, overrides)
        out = hypergrad_at_init(loaded, _engine(engine, loaded), device)
        if as_json:
            _echo(json.dumps(out))
            return
        _echo(f"engine: {out['engine']}  upper loss: {format_number(out['upper_loss'])}")
        if not out["is_hypergradient"]:
            _echo(f"note: {out['engine']} is a single-loop method; this is its first search direction, not a hypergradient")
        for name, value in out["hypergradient"].items():
            for tensor, nested in _flat_gradients(name, value):
                _echo(f"  {gradient_summary(tensor, nested)}")
        _echo(f"  stats: {format_mapping(out['stats'])}")

    _guard(go, debug, threads)


@app.command(cls=_Command, short_help="Export the JSON Schema of spec files.")
def schema(
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="Write to a file instead of standard output."),
    debug: bool = DebugOpt,
) -> None:
    """Export the JSON Schema of spec files."""
    from bilevel.spec.schema import spec_schema

    def go() -> None:
        text = json.dumps(spec_schema(), indent=2)
        if out is None:
            typer.echo(text)
        else:
            out.write_text(text + "\n")

    _guard(go, debug, compute=False)


@app.command(cls=_Command, short_help="List the registered engines and what they assume.")
def engines(as_json: bool = typer.Option(False, "--json", help="Print as JSON."), debug: bool = DebugOpt) -> None:
    """List the registered engines and what they assume."""
    from dataclasses import asdict

    from bilevel.engines import engine_capabilities

    def go() -> None:
        caps = engine_capabilities()
        if as_json:
            typer.echo(json.dumps({k: asdict(c) for k, c in caps.items()}, indent=2))
            return
        for kind, cap in caps.items():
            typer.echo(f"{kind}: {cap.summary}")
            typer.echo(f"    lower level: {', '.join(cap.lower_convexity)}; memory: {cap.memory}; HVPs: {'yes' if cap.needs_hvp else 'no'};"
                       f" constraints: {'yes' if cap.handles_constraints else 'no'}")

    _guard(go, debug, compute=False)


@app.command(cls=_Command, short_help="List the bundled problem presets.")
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

    _guard(go, debug, compute=False)


@app.command(cls=_Command, short_help="Compare runs: figures, report.md, CSV tables.")
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
            _err(f"error: {exc}")
            raise typer.Exit(2) from None
        _echo(f"summary: {files.summary}")
        for path in files.plots:
            _echo(f"figure: {path}")
        for path in files.tables:
            _echo(f"table: {path}")

    _guard(go, debug, compute=False)


@app.command(cls=_Command, short_help="Search engine, learning rates or any field with Optuna.")
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
        _err(f"sweep {plan.sweep.study!r}: {plan.sweep.trials} trial(s) over {searched}; runs in {plan.out}")
        try:
            result = run_sweep(plan.sweep, plan.base, plan.dimensions, plan.out, say=_err)
        except SweepInterrupted as stop:
            _err(f"interrupted: {stop}")
            raise typer.Exit(130) from None
        states = trial_states(result.study)
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        _echo(f"study {plan.sweep.study!r} in {result.storage}: {len(states)} trials ("
              + ", ".join(f"{n} {state}" for state, n in counts.items()) + ")")
        if any(state == "complete" for state in states.values()):
            best = result.study.best_trial
            params = "  ".join(f"{k}={format_number(v)}" for k, v in best.params.items())
            _echo(f"best: trial {best.number}  {plan.sweep.objective} = {format_number(best.value)}  {params}")
            _echo(f"  run directory: {best.user_attrs.get('run_dir')}")
        _echo(f"compare the trials: bilevel report {plan.out}")

    _guard(go, debug, threads)


@app.command(cls=_Command, short_help="Train a searched architecture from scratch.")
def retrain(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                   help="Output directory of an architecture search (holds genotype.json)."),
    step: Optional[int] = typer.Option(None, "--step", metavar="N", help="Retrain the genotype the monitor wrote at this outer step."),
    genotype: Optional[Path] = typer.Option(None, "--genotype", metavar="FILE", help="Retrain this genotype file instead."),
    epochs: Optional[int] = typer.Option(None, "--epochs", metavar="N", help="Training epochs (default: the spec's retrain.epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="LR", help="Initial learning rate (cosine to 0)."),
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
            typer.echo(f"  {cell_type}: " + ", ".join(f"{op} {s}->{d}" for op, s, d in edges))
        typer.echo(f"test accuracy: {format_number(result['test_accuracy'])}{spread}  params: {result['params']}"
                   f"  epochs: {result['epochs']}  time: {result['time_s']:.1f}s")
        typer.echo(f"written: {result['file']}")

    _guard(go, debug, threads)


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
        _flush_or_silence()
        if not process_group_was_created():
            raise
        leave_process(_exit_status(exc))


def _flush_or_silence() -> None:
    """Flush standard output now; if its reader has gone (a closed pipe), silence it so that the
    interpreter's own flush at exit prints no 'Exception ignored ... BrokenPipeError'."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except (OSError, ValueError):
        pass


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
