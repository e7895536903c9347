"""Time and peak memory of ONE dataset-distillation hypergradient: our implicit engine (CG on
Hessian-vector products, memory independent of the inner horizon) against our unrolled engine
(reverse mode through T inner steps; also checkpointed every sqrt(T) steps), on the same problem,
side by side in one process.

Problem: the distill/digits_implicit preset resized: ``ipc`` synthetic images per class, a
linear (strongly convex with L2: both engines target the same hypergradient once the inner solve
converges) or MLP student trained by T SGD steps from a warm start, the real pool as upper data.
``--dataset synthetic`` replaces the 8x8 digits by a 10-class mixture of 28x28 images (10000
examples, written to a temporary .npz), closer to MNIST-sized work for a GPU.

    python benchmarks/distill_timing.py                                  # CPU or the GPU if present
    python benchmarks/distill_timing.py --device cuda --dataset synthetic --ipc 10 50 \
        --students linear mlp --inner-steps 20 100 --json distill_timing.json

Median of ``--repeats`` calls after a warm-up, round-robin across methods, CUDA synchronized
before reading the clock; peak memory from torch.cuda.max_memory_allocated after
reset_peak_memory_stats (GPU only). "cos vs implicit": cosine between the method's hypergradient
and the implicit engine's at the same point."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_name, measure, write_json  # noqa: E402
from bilevel import build_engine, compile_spec  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402


def synthetic_npz(folder: Path, n: int = 12000, side: int = 28, classes: int = 10, seed: int = 0) -> Path:
    """A 10-class mixture of images in [0, 1]: smooth class prototypes plus pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.nn.functional.avg_pool2d(torch.rand(classes, 1, side, side, generator=gen), 5, 1, 2)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = (prototypes[y] + 0.15 * torch.randn(n, 1, side, side, generator=gen)).clamp(0, 1)
    path = folder / "synthetic_images.npz"
    np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy())
    return path


def spec_overrides(ipc: int, student: str, steps: int, device: str, data: dict[str, Any], shape: tuple[int, ...], hidden: int) -> list[str]:
    n = 10 * ipc
    factory = {"linear": "problems.common:linear", "mlp": "problems.common:mlp"}[student]
    kwargs = {"in_shape": list(shape), "classes": 10, **({"hidden": hidden} if student == "mlp" else {})}
    return [
        f"levels.upper.variables.images.shape=[{n}, {', '.join(map(str, shape))}]",
        f"levels.upper.variables.images.init_kwargs={json.dumps({'per_class': ipc, **data})}",
        f"levels.upper.data.kwargs={json.dumps(data)}",
        f"levels.lower.variables.student={json.dumps({'kind': 'module', 'factory': factory, 'kwargs': kwargs})}",
        f"levels.lower.solver.steps={steps}",
        f"levels.lower.solver.lr={0.5 if student == 'linear' else 0.1}",
        f"run.device={device}",
        "report=null",
    ]


def measure_engines(problem, configs: dict[str, Any], repeats: int) -> dict[str, dict[str, Any]]:
    x = problem.fresh(problem.upper.init)
    engines = {name: build_engine(config) for name, config in configs.items()}
    states = {name: engine.init(problem, x) for name, engine in engines.items()}
    batch = problem.upper.batch()

    grads: dict[str, torch.Tensor] = {}  # each method's first hypergradient (its warm-up call), compared below

    def call(name: str):
        result = engines[name].hypergrad(problem, x, states[name], batch)
        states[name] = result.state
        if name not in grads:
            grads[name] = torch.cat([g.reshape(-1) for g in result.grad]).double().cpu()
        return result

    timed = measure({name: lambda name=name: call(name) for name in engines}, problem.device, 1, repeats)
    reference = grads["implicit (CG 20)"]
    out: dict[str, dict[str, Any]] = {}
    for name, row in timed.items():
        grad = grads[name]
        out[name] = {"peak_mib": row["peak_mib"], "times_ms": row["times_ms"], "median_ms": row["median_ms"],
                     "cos_vs_implicit": float(grad @ reference / (grad.norm() * reference.norm()).clamp_min(1e-30))}
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", choices=["digits", "synthetic"], default="digits")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10])
    parser.add_argument("--students", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--hidden", type=int, default=256, help="MLP student width")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = Path(tempfile.mkdtemp())
    if args.dataset == "synthetic":
        data: dict[str, Any] = {"dataset": "npz", "path": str(synthetic_npz(folder)), "n_train": 10000, "seed": 0}
        shape: tuple[int, ...] = (1, 28, 28)
    else:
        data, shape = {"dataset": "digits", "n_train": 1000, "seed": 0}, (1, 8, 8)
    rows: list[dict[str, Any]] = []
    for ipc in args.ipc:
        for student in args.students:
            for steps in args.inner_steps:
                loaded = load_spec(find_preset("distill/digits_implicit"),
                                   overrides=spec_overrides(ipc, student, steps, args.device, data, shape, args.hidden))
                problem = compile_spec(loaded)
                every = max(1, int(math.ceil(math.sqrt(steps))))
                configs = {
                    "implicit (CG 20)": ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=20)),
                    f"unrolled ({steps} steps)": UnrolledConfig(),
                    f"unrolled, checkpoint every {every}": UnrolledConfig(checkpoint_every=every),
                }
                for method, figures in measure_engines(problem, configs, args.repeats).items():
                    rows.append({"ipc": ipc, "student": student, "inner_steps": steps, "method": method,
                                 **{k: v for k, v in figures.items() if k != "times_ms"}, "times_ms": figures["times_ms"]})
                    print(f"ipc {ipc} {student} T={steps} {method}: {figures['median_ms']:.1f} ms"
                          + (f", {figures['peak_mib']:.0f} MiB" if figures["peak_mib"] is not None else ""), file=sys.stderr)
    meta = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda, "dataset": args.dataset,
            "argv": sys.argv[1:] if argv is None else argv}
    print(f"{meta['device']}, torch {meta['torch']}, {args.dataset}, float32, median of {args.repeats}\n")
    print(markdown_table(["ipc", "student", "T", "method", "median ms", "peak MiB", "cos vs implicit"],
                         ([row["ipc"], row["student"], row["inner_steps"], row["method"], f"{row['median_ms']:.1f}",
                           "" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}", f"{row['cos_vs_implicit']:.4f}"] for row in rows)))
    if args.json is not None:
        write_json(args.json, {"meta": meta, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
