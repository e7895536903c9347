"""A batch of bilevel QPs as one batched problem against a Python loop over the instances.

The planar grasp preset (problems/grasp: 3 contacts, 6 forces and 6 friction-cone rows per
instance) with ``--count`` instances (1024 by default):

* batched: one hypergradient of the ``qp`` engine for every instance at once (the QP read off the
  objective and constraints by batched products, one interior-point solve of the whole batch,
  one batched KKT adjoint);
* loop: the same engine called once per instance, each instance compiled as its own problem
  (what a user without batched instances writes);
* the interior-point solve alone, batched and looped, on the QPs of the first call.

Before timing, every instance's batched hypergradient is compared with its looped one. Time per
instance = median time of a call / count (the loop is timed over every instance once per repeat).

    python benchmarks/qp_batch.py [--count 1024] [--repeats 5] [--device cpu|cuda] [--json out.json]"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_name, sync, write_json  # noqa: E402
from bilevel import build_engine, compile_spec  # noqa: E402
from bilevel.compile.instances import instance_specs  # noqa: E402
from bilevel.engines import QPConfig  # noqa: E402
from bilevel.engines.qp_model import InstanceLayout, read_qp  # noqa: E402
from bilevel.linalg.qp import solve_qp  # noqa: E402
from bilevel.spec import spec_from_data  # noqa: E402
from problems.grasp import planar_grasp_spec  # noqa: E402


def _timed(call: Any, device: torch.device, repeats: int) -> tuple[Any, float]:
    value = call()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - started)
    return value, 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = planar_grasp_spec(count=args.count, device=args.device, checkpoint_every=None)
    loaded = spec_from_data(spec.model_dump(mode="json"))
    batched = compile_spec(loaded)
    singles = [compile_spec(one) for one in instance_specs(loaded)]
    engine = build_engine(QPConfig())

    def batched_call() -> Any:
        x = batched.fresh(batched.upper.init)
        return engine.hypergrad(batched, x, engine.init(batched, x), batched.upper.batch())

    def loop_call() -> list[Any]:
        out = []
        for problem in singles:
            x = problem.fresh(problem.upper.init)
            out.append(engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()))
        return out

    together, batched_ms = _timed(batched_call, device, args.repeats)
    alone, loop_ms = _timed(loop_call, device, max(1, args.repeats // 2))
    gap = max(float((together.grad[0][k] - one.grad[0]).abs().max()) for k, one in enumerate(alone))

    x = batched.fresh(batched.upper.init)
    state = engine.init(batched, x)
    qp = read_qp(batched, x, state.lower, batched.lower.batch(), InstanceLayout.of(batched))
    parts = (qp.Q, qp.q, qp.G, qp.h, qp.A, qp.b)
    _, solve_ms = _timed(lambda: solve_qp(*parts), device, args.repeats)
    _, solve_loop_ms = _timed(lambda: [solve_qp(*(t[k:k + 1] for t in parts)) for k in range(args.count)], device,
                              max(1, args.repeats // 2))

    n = args.count
    print(f"planar grasp QPs, {n} instances (6 variables, 6 inequalities each), float64, {device_name(device)},"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"batched and looped hypergradients agree to {gap:.2e} (max abs difference over instances)\n")
    print("| what | one call (ms) | per instance (ms) | batched speedup |")
    print("|---|---|---|---|")
    print(f"| hypergradient, batched (one problem of {n} instances) | {batched_ms:.1f} | {batched_ms / n:.4f} | {loop_ms / batched_ms:.1f}x |")
    print(f"| hypergradient, Python loop over {n} problems | {loop_ms:.1f} | {loop_ms / n:.4f} | 1x |")
    print(f"| interior-point solve, batched | {solve_ms:.1f} | {solve_ms / n:.4f} | {solve_loop_ms / solve_ms:.1f}x |")
    print(f"| interior-point solve, Python loop | {solve_loop_ms:.1f} | {solve_loop_ms / n:.4f} | 1x |")
    if args.json:
        write_json(args.json, {"count": n, "device": device_name(device), "batched_ms": batched_ms, "loop_ms": loop_ms,
                               "solve_ms": solve_ms, "solve_loop_ms": solve_loop_ms, "max_abs_difference": gap})


if __name__ == "__main__":
    main()
