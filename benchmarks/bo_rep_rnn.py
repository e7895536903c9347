"""BO-REP vs implicit and unrolled hypergradients with plain SGD on the upper level, on the
recurrent hyper-representation problem (problems/hyperrep), over several seeds.

Writes docs/figures/bo_rep_rnn.png (validation loss vs outer step, mean and range over seeds) and
prints a table of final validation and test losses.

    python benchmarks/bo_rep_rnn.py [--seeds 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bilevel import run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402

METHODS = {
    "BO-REP, normalized momentum": ["engine.kind=bo_rep"],
    "implicit (CG), SGD": ["engine.kind=implicit", "levels.upper.solver={name: sgd, lr: 0.5}"],
    "unrolled, SGD": ["engine.kind=unrolled", "levels.upper.solver={name: sgd, lr: 0.5}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "bo_rep_rnn.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves: dict[str, list[list[float]]] = {}
    finals: dict[str, list[dict]] = {}
    for name, overrides in METHODS.items():
        for seed in range(args.seeds):
            out = Path(tempfile.mkdtemp())
            loaded = load_spec(find_preset("hyperrep/rnn_bo_rep"), overrides=[*overrides, f"run.seed={seed}", f"run.steps={args.steps}",
                                                                              "run.checkpoint_every=null"])
            began = time.perf_counter()
            try:
                result = run(loaded, out=out, progress=False)
                report = result.result["report"] | {"final_val_loss": result.result["final_upper_loss"]}
            except Exception as exc:  # a diverged baseline is a result, not a crash
                report = {"final_val_loss": float("nan"), "test_loss": float("nan"), "test_accuracy": float("nan"), "error": str(exc)[:80]}
            report["time_s"] = time.perf_counter() - began
            losses = [json.loads(line)["upper_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            curves.setdefault(name, []).append(losses)
            finals.setdefault(name, []).append(report)

    print(f"| method | final validation loss | test loss | test accuracy | time per run |")
    print("|---|---|---|---|---|")
    for name, reports in finals.items():
        def stat(key: str) -> str:
            values = [r[key] for r in reports if r[key] == r[key]]
            if not values:
                return "diverged"
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} +- {spread:.3f}" + ("" if len(values) == len(reports) else f" ({len(reports) - len(values)} diverged)")
        print(f"| {name} | {stat('final_val_loss')} | {stat('test_loss')} | {stat('test_accuracy')} | {statistics.mean(r['time_s'] for r in reports):.1f} s |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in curves.items():
        length = min(len(r) for r in runs)
        data = torch.tensor([r[:length] for r in runs])
        steps = range(1, length + 1)
        ax.plot(steps, data.mean(0), label=name)
        ax.fill_between(steps, data.min(0).values, data.max(0).values, alpha=0.2)
    ax.set_xlabel("outer step")
    ax.set_ylabel("validation loss (upper objective)")
    ax.set_yscale("log")
    ax.set_title(f"Recurrent hyper-representation, {args.seeds} seeds (mean, min-max)")
    ax.legend()
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
