"""Wall time of the default job with torch's own thread count against the command line's default
of one thread (bilevel.runtime.threads), the README's "Threads" table.

    python benchmarks/thread_default.py                      # 5 interleaved repetitions, 150 and 20 steps
    python benchmarks/thread_default.py --reps 3 --steps 20
    python benchmarks/thread_default.py --baseline-src DIR   # "before" runs the package found in DIR

Each repetition runs, one after the other, every variant on every step count: ``bilevel run`` of
the default preset (hyperclean/digits) with ``--set run.steps=S``, once with ``--threads N`` (N:
torch's default here, one per core: what a run did before the default) and once without
(one thread). With ``--baseline-src DIR`` the first variant runs the code in DIR instead (for
example an export of the commit before the default: ``git archive COMMIT | tar -x -C DIR``),
with torch's default. OMP_NUM_THREADS, MKL_NUM_THREADS and BILEVEL_THREADS are removed from the
runs' environment. Printed per variant and step count: the median (and min, max) of the whole
command's wall time, start-up and the final evaluation included, and of the outer loop's
(result.json wall_time_s), with the load average before and after."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _torch_default_threads() -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def _run(args: list[str], env: dict[str, str], out: Path) -> tuple[float, float, int]:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bilevel", "run", *args, "-q", "--out", str(out)], env=env, check=True,
                   capture_output=True, text=True)
    wall = time.perf_counter() - began
    result = json.loads((out / "result.json").read_text())
    return wall, float(result["wall_time_s"]), int(result.get("threads", -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 20])
    parser.add_argument("--baseline-src", type=Path, default=None, help="run the 'before' variant from this source tree")
    args = parser.parse_args()

    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BILEVEL_THREADS")}
    many = _torch_default_threads()
    if args.baseline_src is not None:
        before = ("before (code in --baseline-src, torch default)", [], {**clean, "PYTHONPATH": str(args.baseline_src.resolve())})
    else:
        before = (f"torch default ({many} threads: --threads {many})", ["--threads", str(many)], clean)
    variants = [before, ("default (1 thread)", [], clean)]
    times: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.reps):
            for steps in args.steps:
                for name, extra, env in variants:
                    out = Path(scratch) / f"{rep}-{steps}-{len(times)}"
                    measured = _run([*extra, "--set", f"run.steps={steps}"], env, out)
                    times.setdefault((name, steps), []).append(measured)
                    print(f"rep {rep + 1} steps {steps:4d} {name}: command {measured[0]:.1f} s, loop {measured[1]:.1f} s"
                          f" (threads in result.json: {measured[2]})", flush=True)
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min), {os.cpu_count()} CPUs,"
          f" {args.reps} interleaved repetitions")
    print("| variant | steps | command wall time, median (min-max) | outer loop, median (min-max) |")
    print("|---|---|---|---|")
    for (name, steps), values in times.items():
        command = [v[0] for v in values]
        loop = [v[1] for v in values]
        print(f"| {name} | {steps} | {statistics.median(command):.1f} s ({min(command):.1f}-{max(command):.1f})"
              f" | {statistics.median(loop):.1f} s ({min(loop):.1f}-{max(loop):.1f}) |")


if __name__ == "__main__":
    main()
