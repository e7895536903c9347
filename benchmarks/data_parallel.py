"""Data-parallel runs against the single-process run: wall time per outer step and how far the
final upper variables are from the single-process ones, for 1, 2, ... processes launched by torchrun.

    python benchmarks/data_parallel.py hyperclean/digits --steps 20 --nproc 1 2 [--device cpu|cuda] [--set a.b=v ...]

Prints a table, then the figures as JSON. On CPU with small problems the collectives' latency
dominates (every inner step and every Hessian-vector product is one all-reduce); data
parallelism pays off when a step's compute is large (big data, models, GPUs: one process per GPU)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _flat(value: object) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [float(value)]  # type: ignore[arg-type]


def launch(spec: str, nproc: int, steps: int, device: str, overrides: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "bilevel", "run", spec, "--out", str(out), "-q", "--device", device,
               "--set", f"run.steps={steps}", "--set", "run.checkpoint_every=null"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads((out / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="spec file or preset")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec override, repeatable")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: launch(args.spec, n, args.steps, args.device, args.overrides, Path(tmp) / str(n)) for n in args.nproc}
    reference = _flat(results[args.nproc[0]]["upper_variables"])
    scale = max(math.sqrt(sum(v * v for v in reference)), 1e-300)
    for n, result in results.items():
        x = _flat(result["upper_variables"])
        rows.append({
            "processes": n,
            "wall_time_s": result["wall_time_s"],
            "ms_per_step": 1000 * result["wall_time_s"] / max(result["steps"], 1),
            "final_upper_loss": result["final_upper_loss"],
            "rel_diff_x": math.sqrt(sum((a - b) ** 2 for a, b in zip(x, reference))) / scale,
            "device": result["device"],
        })
    print(f"{'processes':>9s} {'ms/step':>10s} {'final upper loss':>17s} {'|x - x_1|/|x_1|':>16s}")
    for row in rows:
        print(f"{row['processes']:9d} {row['ms_per_step']:10.1f} {row['final_upper_loss']:17.8g} {row['rel_diff_x']:16.3g}")
    print(json.dumps({"command": " ".join(sys.argv), "torch": __import__("torch").__version__, "rows": rows}))


if __name__ == "__main__":
    main()
