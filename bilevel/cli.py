"""The `bilevel` command line: run | plan | validate | hypergrad | schema | engines | problems.

Errors in a spec print one line per problem (file, dotted field path, what was expected) and exit
with code 2, without a traceback unless --debug is given. A run stopped by the NaN/inf guard
exits with code 3."""

from __future__ import annotations

import json
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


def _err(message: str) -> None:
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
        _err(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
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
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Run the outer loop; write result.json, metrics.jsonl and checkpoints. Without SPEC, runs the
    default preset (data hyper-cleaning on the digits data)."""
    from bilevel.runtime.loop import run as run_loop

    def go() -> None:
        loaded = _load(spec, overrides)
        result = run_loop(loaded, _engine(engine, loaded), device, out, resume, progress=not quiet, log=_err)
        r = result.result
        typer.echo(f"engine: {r['engine']}  steps: {r['steps']}  final upper loss: {r['final_upper_loss']:.6g}"
                   f"  wall time: {r['wall_time_s']:.1f}s  device: {r['device']}")
        for key, value in (r.get("report") or {}).items():
            typer.echo(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        for item in r.get("instances") or []:  # a batch of instances: one line each
            figures = "  ".join(f"{k}: {v:.4f}" for k, v in (item.get("report") or {}).items() if isinstance(v, float))
            typer.echo(f"  instance {item['index']}: final upper loss {item['final_upper_loss']:.6g}  {figures}".rstrip())
        fast = r.get("fast_path")
        if fast and not (fast["requested"] == "auto" and r["device"] == "cpu"):  # CPU auto: plain eager, nothing to say
            typer.echo(f"fast path ({fast['requested']}): hypergradient {fast['hypergradient']}, inner loop {fast['inner_loop']}"
                       + "".join(f"\n  {reason}" for reason in fast["reasons"]))
        typer.echo(f"results in {result.out}/result.json")

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

    _guard(go)


@app.command()
def validate(spec: Optional[str] = SpecArg, device: Optional[str] = DeviceOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Check a spec: schema, references to user code, a dry run of every objective, and the plan.
    Exits 0 when valid, 2 otherwise."""
    from bilevel.compile import compile_spec
    from bilevel.planner import make_plan

    def go() -> None:
        loaded = _load(spec, overrides)
        make_plan(loaded, compile_spec(loaded, device))
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
            typer.echo(json.dumps(out))
            return
        typer.echo(f"engine: {out['engine']}  upper loss: {out['upper_loss']:.6g}")
        if not out["is_hypergradient"]:
            typer.echo(f"note: {out['engine']} is a single-loop method; this is its first search direction, not a hypergradient")
        for name, value in out["hypergradient"].items():
            typer.echo(f"  d upper / d {name}: {json.dumps(value)[:200]}")
        typer.echo(f"  stats: {json.dumps(out['stats'])}")

    _guard(go)


@app.command()
def schema(out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to a file instead of stdout.")) -> None:
    """Export the JSON Schema of spec files."""
    from bilevel.spec.schema import spec_schema

    text = json.dumps(spec_schema(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")


@app.command()
def engines(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the registered engines and what they assume."""
    from dataclasses import asdict

    from bilevel.engines import engine_capabilities

    caps = engine_capabilities()
    if as_json:
        typer.echo(json.dumps({k: asdict(c) for k, c in caps.items()}, indent=2))
        return
    for kind, cap in caps.items():
        typer.echo(f"{kind}: {cap.summary}")
        typer.echo(f"    lower level: {', '.join(cap.lower_convexity)}; memory: {cap.memory}; HVPs: {'yes' if cap.needs_hvp else 'no'};"
                   f" constraints: {'yes' if cap.handles_constraints else 'no'}")


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


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
