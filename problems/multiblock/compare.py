"""BSVRB, the plain blockwise stochastic method and full-batch implicit differentiation on a
multi-block problem, several seeds, the upper loss against the number of block-solves.

A block-solve is one block's lower update: BSVRB and the plain method update the k drawn blocks
once per step (k block-solves), the implicit engine solves all m blocks per step (m block-solves,
each of T warm-started inner steps and a conjugate-gradient solve). Every method gets the same
budget of block-solves; the curves are the monitor's upper loss over every task (for the
hyper-representation: at the exact heads theta_i*(W), so the methods are compared on F itself).

    python -m problems.multiblock.compare --family hyperrep --seeds 0 1 2 --plot docs/figures/multiblock_hyperrep.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
FAMILIES = {
    "hyperrep": {"preset": "hyperrep_bsvrb.yaml", "metric": "upper_exact", "label": "F(W) at the exact heads (validation MSE)",
                 "lower_lr": {"bsvrb": 0.003, "plain": 0.03, "implicit": 0.1}, "upper_lr": 0.4,
                 "monitor_n": ("n_train", "n_val")},
    "l2": {"preset": "l2_bsvrb.yaml", "metric": "val_loss", "label": "mean validation loss over the tasks",
           "lower_lr": {"bsvrb": 0.1, "plain": 1.0, "implicit": 0.5}, "upper_lr": 3.0, "monitor_n": ("n",)},
}
METHODS = ("bsvrb", "plain", "implicit")


def method_spec(family: str, method: str, seed: int, budget: int, points: int, lower_lr: float | None = None,
                upper_lr: float | None = None, batch_size: int | None = None, examples: int | None = None
                ) -> tuple[dict[str, Any], int]:
    """The spec data of one method's run within ``budget`` block-solves, and its block-solves per
    step. ``examples``: training and validation examples per task; ``batch_size``: minibatches of
    each task's data for the stochastic methods (the implicit engine always takes full batches)."""
    info = FAMILIES[family]
    data = yaml.safe_load((HERE / info["preset"]).read_text())
    lower = next(level for level in data["levels"].values() if "blocks" in level)
    blocks = lower["blocks"]
    if examples is not None:
        data["monitor_kwargs"].update({name: examples for name in info["monitor_n"]})
    for level in data["levels"].values():
        if examples is not None:
            level["data"]["kwargs"]["n"] = examples
        if batch_size is not None and method != "implicit":
            level["data"]["batch_size"] = batch_size
    if method == "implicit":
        blocks.pop("sample", None)
        data["engine"] = {"kind": "implicit", "linear_solver": {"method": "cg", "maxiter": 20}}
        per_step = blocks["count"]
    else:
        data["engine"] = {"kind": "bsvrb", "variance_reduction": method == "bsvrb"}
        per_step = blocks["sample"]
    lower["solver"]["lr"] = lower_lr if lower_lr is not None else info["lower_lr"][method]
    upper = next(level for level in data["levels"].values() if "parent" not in level)
    upper["solver"]["lr"] = upper_lr if upper_lr is not None else info["upper_lr"]
    steps = max(budget // per_step, 1)
    data["run"].update(seed=seed, steps=steps, monitor_every=max(steps // points, 1), log_every=max(steps // points, 1),
                       checkpoint_every=None)
    data["name"] = f"{data['name'].rsplit('-', 1)[0]}-{method}"
    return data, per_step


def run_method(family: str, method: str, seed: int, budget: int, points: int, out: Path, **lrs: Any) -> dict[str, Any]:
    from bilevel import run
    from bilevel.spec import spec_from_data

    data, per_step = method_spec(family, method, seed, budget, points, **lrs)
    began = time.perf_counter()
    result = run(spec_from_data(data), out=out / f"{family}_{method}_seed{seed}", overwrite=True, progress=False)
    wall = time.perf_counter() - began
    metric = FAMILIES[family]["metric"]
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"] * per_step, r["monitor"][metric]) for r in records if "monitor" in r]
    return {"family": family, "method": method, "seed": seed, "curve": curve, "wall_s": wall,
            "final": curve[-1][1] if curve else float("nan"), "lower_lr": data["levels"][next(
                n for n, level in data["levels"].items() if "blocks" in level)]["solver"]["lr"]}


def table(rows: list[dict[str, Any]], fractions: tuple[float, ...] = (0.25, 0.5, 1.0)) -> str:
    """Markdown: the metric's mean +- std over seeds at fractions of the budget, and wall time."""
    budget = max(point[0] for row in rows for point in row["curve"])
    head = " | ".join(f"{int(f * budget)} block-solves" for f in fractions)
    lines = [f"| method | lower lr | {head} | wall time (s) |", "|---" * (len(fractions) + 3) + "|"]
    for method in METHODS:
        mine = [row for row in rows if row["method"] == method]
        if not mine:
            continue
        cells = []
        for fraction in fractions:
            values = [min(row["curve"], key=lambda p: abs(p[0] - fraction * budget))[1] for row in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        wall = statistics.mean(row["wall_s"] for row in mine)
        lines.append(f"| {method} | {mine[0]['lower_lr']} | {' | '.join(cells)} | {wall:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], family: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, color in zip(METHODS, ("tab:blue", "tab:orange", "tab:green")):
        mine = [row for row in rows if row["method"] == method]
        if not mine:
            continue
        xs = [p[0] for p in mine[0]["curve"]]
        columns = list(zip(*[[p[1] for p in row["curve"]] for row in mine]))
        means = [statistics.mean(c) for c in columns]
        spreads = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
        name = {"bsvrb": "BSVRB", "plain": "plain blockwise", "implicit": "full-batch implicit"}[method]
        ax.plot(xs, means, color=color, label=f"{name} ({len(mine)} seed{'s' if len(mine) > 1 else ''})")
        ax.fill_between(xs, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)], color=color, alpha=0.2)
    ax.set_xlabel("block-solves")
    ax.set_ylabel(FAMILIES[family]["label"])
    ax.set_yscale("log")
    ax.set_title(f"{family}: mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="hyperrep")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=20000, help="block-solves per run")
    parser.add_argument("--points", type=int, default=20, help="monitor evaluations per run")
    parser.add_argument("--out", type=Path, default=Path("runs/multiblock-compare"))
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="minibatches inside each task (stochastic methods)")
    parser.add_argument("--examples", type=int, default=None, help="training and validation examples per task")
    args = parser.parse_args(argv)
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            rows.append(run_method(args.family, method, seed, args.budget, args.points, args.out,
                                   batch_size=args.batch_size, examples=args.examples))
            print(f"done {args.family} {method} seed {seed}: {rows[-1]['final']:.4g} ({rows[-1]['wall_s']:.0f} s)", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{args.family}.json").write_text(json.dumps(rows))
    print(table(rows))
    if args.plot is not None:
        plot(rows, args.family, args.plot)


if __name__ == "__main__":
    main()
