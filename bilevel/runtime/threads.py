"""How many CPU threads torch's operators use in a command-line run.

torch starts with one intra-op thread per core. The problems this package is mostly used on are
small (a few thousand parameters, a few hundred examples): each operator takes microseconds,
and a second thread buys nothing but synchronization. On a machine whose cores are shared
(other jobs, other tests), the threads also wait for each other: the outer loop of the default
hyper-cleaning job took 157 s on torch's 2 threads against 13 s on one (medians of 5, a loaded
2-core machine; README, "Threads", and benchmarks/thread_default.py).

The command line therefore uses one thread unless told otherwise:

1. ``--threads N`` (or ``BILEVEL_THREADS=N``): N threads;
2. else, when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set, torch's own setting (which
   follows them): the person who set them chose;
3. else one thread.

One thread also makes float32 results the same whatever the machine's core count: the order of
a reduction's partial sums depends on the number of threads. Large problems on a CPU (the
CIFAR-10 architecture search, wide networks) gain from more threads: give ``--threads``. The
Python API leaves torch's setting as it is; call ``configure_threads`` to apply the same rule."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_THREADS", "THREADS_ENV", "ThreadSetting", "configure_threads"]

DEFAULT_THREADS = 1
"""Intra-op threads of a command-line run when nothing else is said."""

THREADS_ENV = "BILEVEL_THREADS"
"""Environment variable read when ``--threads`` is not given."""

_TORCH_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadSetting:
    """The thread count in force and where it came from (``--threads``, an environment variable,
    or the default)."""

    threads: int
    source: str


def _parse(value: str, where: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{where}: expected a positive integer number of threads, got {value!r}")
    return count


def configure_threads(requested: int | None = None) -> ThreadSetting:
    """Set torch's intra-op thread count by the rule of this module and say what it is.

    ``requested`` is ``--threads`` (None: not given). ValueError for a count below 1 or a
    ``BILEVEL_THREADS`` that is not a positive integer."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads: expected a positive integer number of threads, got {requested}")
        count, source = requested, "--threads"
    elif os.environ.get(THREADS_ENV):
        count, source = _parse(os.environ[THREADS_ENV], THREADS_ENV), THREADS_ENV
    else:
        chosen = next((name for name in _TORCH_ENV if os.environ.get(name)), None)
        if chosen is not None:
            return ThreadSetting(torch.get_num_threads(), chosen)
        count, source = DEFAULT_THREADS, "default"
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return ThreadSetting(count, source)
