"""What the commands of `bilevel` share: the typer application and its plain-help command class,
the option declarations, printing on rank 0, and ``guard``, which runs a command's body with the
--debug and thread settings and turns its errors into messages and exit codes (bilevel.cli)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core

from bilevel.presets import DEFAULT_PRESET, find_preset, list_presets
from bilevel.spec.errors import SpecError

__all__ = [
    "BROKEN_PIPE_EXIT",
    "DebugOpt",
    "DeviceOpt",
    "EngineOpt",
    "JsonOpt",
    "PluginOpt",
    "SetOpt",
    "SpecArg",
    "ThreadsOpt",
    "UsageProblem",
    "app",
    "command",
    "echo",
    "engine_override",
    "err",
    "guard",
    "import_plugins",
    "load_spec_arg",
    "references_of",
    "spec_path",
    "rank",
    "silence_stdout",
]

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


def command(name: Optional[str] = None, *, short_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command of ``app`` with the plain help (``_Command``) and its one-line summary."""
    return app.command(name, cls=_Command, short_help=short_help)


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
PluginOpt = typer.Option(None, "--plugin", metavar="MODULE",
                         help="Import a module or file that registers engines (as a spec's plugins). Repeatable.")


def rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def echo(message: str) -> None:
    """Print a result: on rank 0 only."""
    if rank() == 0:
        typer.echo(message)


def err(message: str) -> None:
    """Print a message every rank would print alike (spec errors, warnings): on rank 0 only."""
    if rank() == 0:
        typer.echo(message, err=True)


def silence_stdout() -> None:
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


def guard(fn: Callable[[], Any], debug: bool = False, threads: Optional[int] = None, compute: bool = True) -> Any:
    """Run a command's body: apply --debug and the thread setting (``compute``), and turn errors
    into messages and exit codes (bilevel.cli's docstring)."""
    from bilevel.runtime.failures import UserCodeFailure
    from bilevel.runtime.loop import DivergenceError
    from bilevel.runtime.signals import RunInterrupted

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
        err(f"error: {exc}")
        if _debug["on"]:
            raise
        raise typer.Exit(2) from None
    except SpecError as exc:
        for issue in exc.issues:
            err(f"error: {issue}")
        if _debug["on"]:
            raise
        raise typer.Exit(2) from None
    except DivergenceError as exc:
        err(f"diverged: {exc}")
        if _debug["on"]:
            raise
        raise typer.Exit(3) from None
    except RunInterrupted as exc:
        err(f"interrupted: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except UserCodeFailure as exc:
        err(f"failed: {exc}")
        if _debug["on"]:
            raise
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        silence_stdout()
        raise typer.Exit(BROKEN_PIPE_EXIT) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if _debug["on"]:
            raise
        where = f"[rank {rank()}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        typer.echo(f"{where}error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None


def spec_path(spec: Optional[str]) -> Path:
    """The file a SPEC argument names: a file, or a preset's name (the default preset when none)."""
    name = spec or DEFAULT_PRESET
    path = Path(name)
    if not path.exists():
        preset = find_preset(name)
        if preset is None:
            raise SpecError.single(name, "", f"no such file, and no preset of that name (presets: {', '.join(list_presets())})")
        path = preset
    return path


def references_of(spec: Optional[str]) -> list[tuple[str, str]]:
    """(dotted path, reference) for every reference to code in a SPEC argument's file."""
    from bilevel.spec.reading import read_data
    from bilevel.spec.references import spec_references

    return spec_references(read_data(spec_path(spec))[0])


def load_spec_arg(spec: Optional[str], overrides: Optional[list[str]], engine: Optional[str] = None) -> Any:
    """The LoadedSpec of a SPEC argument (a file, or a preset's name; the default preset when
    none is given) with the --set overrides applied. ``engine`` (--engine KIND) is applied
    first, as ``engine: {kind: KIND}`` unless the spec's engine is already of that kind, so that
    ``--set engine.*`` refines it."""
    from bilevel.spec.load import load_spec

    path = spec_path(spec)
    overrides = list(overrides or [])
    if engine is not None:
        engine_override(engine)  # an unknown kind: the error names --engine
        from bilevel.spec.reading import read_data

        declared = read_data(path)[0].get("engine")
        if not (isinstance(declared, dict) and declared.get("kind") == engine):
            overrides.insert(0, f"engine={{kind: {engine}}}")
    return load_spec(path, overrides)


def engine_override(kind: Optional[str]) -> Any:
    """The engine config of --engine KIND (None when not given)."""
    if kind is None:
        return None
    from bilevel.engines import engine_config, engine_kinds

    try:
        return engine_config(kind)
    except KeyError:
        raise SpecError.single("--engine", "engine", f"unknown engine {kind!r}; expected auto or one of: {', '.join(engine_kinds())}") from None


def import_plugins(plugins: Optional[list[str]]) -> None:
    """Import the --plugin modules (which register engines)."""
    from bilevel.refs import RefError, import_module_ref

    for ref in plugins or []:
        try:
            import_module_ref(ref)
        except RefError as exc:
            raise SpecError.single("--plugin", ref, str(exc)) from None


AllowImportsOpt = typer.Option(
    None, "--allow-imports", metavar="PACKAGES",
    help="Import only these packages (comma-separated) and files in the spec's folder from a spec's references;"
         " as BILEVEL_ALLOW_IMPORTS does (docs/getting-started.md).")


@app.callback()
def _root(debug: bool = DebugOpt, threads: Optional[int] = ThreadsOpt, allow_imports: Optional[str] = AllowImportsOpt) -> None:
    """Declarative bilevel optimization: declare the levels, the planner picks the hypergradient engine."""
    _debug["on"] = debug
    _root_threads["threads"] = threads
    from bilevel.refs import set_allowed_imports

    set_allowed_imports(allow_imports)  # every command sets it (None: BILEVEL_ALLOW_IMPORTS decides)
