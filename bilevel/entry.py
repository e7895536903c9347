"""The console entry point, light enough to install the signal handling before the package (and
torch) are imported: Ctrl-C or SIGTERM at any moment ends the command with a one-line message
and its documented exit code (130, 143), never a traceback. During a run's outer loop the loop's
own handling takes over (``bilevel.runtime.signals``: stop between steps with a checkpoint)."""

from __future__ import annotations

import signal
import sys
from types import FrameType

__all__ = ["main"]


def _terminated(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("SIGTERM received: stopped\n")
    raise SystemExit(143)


def main() -> None:
    """``bilevel``: the command line (``bilevel.cli``)."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from bilevel.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:  # outside a command's own handling (imports, start-up, shutdown)
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
