"""The `bilevel` command line: run | plan | validate | hypergrad (bilevel.cli.compute) and
schema | engines | problems | report | sweep | meta-test | retrain (bilevel.cli.tools), on the
application, options and error handling of bilevel.cli.common.

Errors in a spec print one line per problem (file, dotted field path, what was expected) and exit
with code 2, without a traceback unless --debug is given (before or after the command's name). A
run stopped by the NaN/inf guard exits with code 3, an interrupted one (Ctrl-C) with 130, and a
command whose output pipe was closed early (``bilevel plan | head -1``) stops quietly with 141.
Commands that compute use one CPU thread unless --threads or OMP_NUM_THREADS says otherwise
(bilevel.runtime.threads). Under torchrun (`torchrun --nproc_per_node N -m bilevel run SPEC`)
every process runs the command; only rank 0 prints results and the errors every rank shares."""

from __future__ import annotations

import sys

from bilevel.cli import compute as _compute, tools as _tools  # noqa: F401  (they register the commands, in this order)
from bilevel.cli.common import BROKEN_PIPE_EXIT, UsageProblem, app, silence_stdout
from bilevel.cli.compute import gradient_summary

__all__ = ["BROKEN_PIPE_EXIT", "UsageProblem", "app", "gradient_summary", "main"]


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
        silence_stdout()
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
