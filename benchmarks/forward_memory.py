"""Peak memory and time of ONE hypergradient, forward mode against reverse-mode unrolling, as the
inner horizon T grows (CPU).

    python benchmarks/forward_memory.py [--horizons 10 100 1000] [--hidden 64] [--json out.json]

Problem: the digits MLP (64 -> hidden -> 10, ReLU) trained by T momentum-SGD steps on minibatches of
50, its learning rate and momentum tuned (2 upper scalars; problems/schedule), cold start, float32.
Each (engine, T) runs in a fresh subprocess, so one measurement does not inherit another's heap:

* ``profiler MiB``: the peak of live tensor memory during the call, from torch's memory profiler
  (``torch.profiler.profile(profile_memory=True)``: every operator's allocations and frees in
  order, summed as they happen), above what was live before the call; for T up to
  ``--profile-up-to`` (100), since the profiler's own event list grows with the operators recorded;
* ``RSS MiB``: the rise of the process's peak resident set size during the call (Linux: VmHWM,
  reset through /proc/self/clear_refs after glibc's malloc_trim), allocator overhead included;
* ``time s``: the call's wall time (a separate, unprofiled call).

The two engines compute the same hypergradient (``max |diff|``, against unrolled)."""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(kind: str, horizon: int, hidden: int, profile_up_to: int) -> dict[str, Any]:
    """In this process: one hypergradient of ``kind`` through ``horizon`` steps, three ways."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bilevel import build_engine, compile_spec
    from bilevel.spec import spec_from_data
    from problems.schedule import schedule_spec

    data = schedule_spec(hidden=hidden, delta=horizon).spec.model_dump(mode="json")
    data["levels"]["lower"]["solver"]["warm_start"] = False
    data["engine"] = {"kind": kind}
    problem = compile_spec(spec_from_data(data))
    engine = build_engine(problem.engine)
    x = problem.fresh(problem.upper.init)

    def call() -> Any:
        torch.manual_seed(0)
        return engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())

    call()  # warm-up (first-call allocations, lazy imports)
    began = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - began
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back, so that the call's peak shows
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    call()
    rss = _status("VmHWM") - before
    peak = float("nan")
    if horizon <= profile_up_to:  # the profiler keeps every operator's event: gigabytes for thousands of steps
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        live = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
    return {"engine": kind, "T": horizon, "profiler_mib": peak / 2**20, "rss_mib": rss, "time_s": seconds,
            "grad": [g.tolist() for g in result.grad]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile-up-to", type=int, default=100,
                        help="profile the horizons up to this one (the profiler's event list grows with T: ~7 GB at T = 1000)")
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.hidden, args.profile_up_to)))
        return
    rows = []
    for horizon in args.horizons:
        for kind in ("unrolled", "forward"):
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(horizon), "--hidden", str(args.hidden),
                                  "--profile-up-to", str(args.profile_up_to)],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| T | engine | profiler MiB | RSS MiB | time s | max abs diff vs unrolled |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        reference = next(r for r in rows if r["T"] == row["T"] and r["engine"] == "unrolled")
        import torch

        diff = max(float((torch.tensor(a) - torch.tensor(b)).abs().max()) for a, b in zip(row["grad"], reference["grad"]))
        profiled = "not profiled" if row["profiler_mib"] != row["profiler_mib"] else f"{row['profiler_mib']:.2f}"
        print(f"| {row['T']} | {row['engine']} | {profiled} | {row['rss_mib']:.1f} | {row['time_s']:.2f} |"
              f" {diff:.1e} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
