"""Architecture searches on digits against random architectures: DARTS (first and second order)
and RARTS on the `nas/digits` cells, sharpDARTS and MaxW DARTS on the `nas/digits_sharpdarts`
cells, weight-entangled against one-weight-per-candidate supernets on the `nas/digits_entangled`
cells and the `nas/digits_macro` layers.

Every method searches with its preset (three seeds each); the derived architecture is retrained
from scratch with the preset's retraining budget (and, with ``--retrain-as``, with other presets'
retraining too, so that architectures are compared under one training protocol); architectures
drawn uniformly from each method's search space are retrained the same way. Prints one table per
search space (test accuracy mean +- std, search time) and writes the full figures as JSON.
``--memory`` measures parameters and the peak memory of one training step of the entangled and
the one-weight-per-candidate supernets instead.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py                 # the DARTS / RARTS table
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --methods "DARTS 2nd order" --seeds 1 \
        --random 0 --figure docs/figures/darts_cell.png                            # the how-to's figure
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --step-times 10  # cost per outer step
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --seeds 1 --random 2 --steps 20   # quick look
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --methods "DARTS 2nd order, exact" sharpDARTS \
        "sharpDARTS, MaxW" --retrain-as nas/digits nas/digits_sharpdarts         # the sharpDARTS table
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --methods "macro, entangled" "macro, separate" \
        "cells, entangled" "cells, separate"                                       # the entangled tables
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --memory         # the memory table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bilevel  # noqa: E402
from benchmarks._common import measure, write_json  # noqa: E402
from bilevel.nas.draw import draw_architecture  # noqa: E402
from bilevel.nas.genotype import architecture_from_json, random_architecture  # noqa: E402
from bilevel.nas.retrain import retrain  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.engines import DartsConfig, RartsConfig  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402

ARCH = "levels.upper.variables.arch"


@dataclass(frozen=True)
class Method:
    """A search: a preset, the engine (None: the planner's choice) and ``--set`` overrides."""

    preset: str
    engine: Any = None
    overrides: tuple[str, ...] = ()


EXACT = DartsConfig(order=2, hessian="exact")  # the planner's choice on every digits preset here
METHODS = {
    "DARTS 1st order": Method("nas/digits", DartsConfig(order=1)),
    "DARTS 2nd order": Method("nas/digits", DartsConfig(order=2)),
    "DARTS 2nd order, exact": Method("nas/digits", EXACT),
    "RARTS": Method("nas/digits", RartsConfig()),
    "RARTS (beta = 1)": Method("nas/digits", RartsConfig(beta=1.0)),
    "sharpDARTS": Method("nas/digits_sharpdarts", EXACT),
    "sharpDARTS, MaxW": Method("nas/digits_sharpdarts", EXACT, (f"{ARCH}.space.op_weighting=max_w",)),
    "cells, entangled": Method("nas/digits_entangled", EXACT),
    "cells, separate": Method("nas/digits_entangled", EXACT, (f"{ARCH}.space.mixed_op=separate",)),
    "macro, entangled": Method("nas/digits_macro", EXACT),
    "macro, separate": Method("nas/digits_macro", EXACT, (f"{ARCH}.space.mixed_op=separate",)),
}
DEFAULT_METHODS = ["DARTS 1st order", "DARTS 2nd order", "DARTS 2nd order, exact", "RARTS", "RARTS (beta = 1)"]
MEMORY_PAIRS = {"nas/digits_macro": "macro layers (4 layers; kernels 3, 5, 7; widths 8, 16, 32)",
                "nas/digits_entangled": "cells (sep_conv and dil_conv, 3x3 and 5x5)"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _architecture(preset: str, overrides: list[str]) -> Any:
    return load_spec(find_preset(preset), overrides=overrides).spec.levels["upper"].variables["arch"]


def _retrain_as(genotype: Any, preset: str, protocols: list[str], overrides: list[str]) -> dict[str, float]:
    """Test accuracy of ``genotype`` (of ``preset``'s space) retrained with each protocol's settings."""
    arch = _architecture(preset, overrides)
    out = {}
    for protocol in protocols:
        settings = _architecture(protocol, []).retrain
        out[protocol] = retrain(genotype, arch.model_copy(update={"retrain": settings}), settings, ROOT)["test_accuracy"]
    return out


def search(name: str, method: Method, seed: int, overrides: list[str], out: Path, protocols: list[str]) -> dict[str, Any]:
    loaded = load_spec(find_preset(method.preset), overrides=[f"run.seed={seed}", *method.overrides, *overrides])
    began = time.perf_counter()
    result = bilevel.run(loaded, engine=method.engine, device="cpu", out=out, overwrite=True, progress=False)
    total = time.perf_counter() - began
    report = result.result["report"]
    space = loaded.spec.levels["upper"].variables["arch"].space
    genotype = architecture_from_json(json.loads((out / "genotype.json").read_text()), space)
    accuracies = {method.preset: report["test_accuracy"]}
    accuracies.update(_retrain_as(genotype, method.preset, [p for p in protocols if p != method.preset], list(method.overrides)))
    return {
        "method": name,
        "preset": method.preset,
        "seed": seed,
        "test_accuracy": report["test_accuracy"],
        "test_accuracy_by_protocol": accuracies,
        "search_time_s": result.result["wall_time_s"],
        "retrain_time_s": report["retrain_time_s"],
        "total_time_s": total,
        "skip_connections_normal": report.get("skip_connections_normal"),
        "genotype": genotype.to_json(),
    }


def random_cells(count: int, overrides: list[str], preset: str = "nas/digits", protocols: list[str] | None = None) -> list[dict[str, Any]]:
    """``count`` architectures drawn uniformly from ``preset``'s space (seeded), retrained with the
    preset's settings and with each of ``protocols``."""
    spec = _architecture(preset, overrides)
    generator = torch.Generator().manual_seed(12345)
    rows = []
    for index in range(count):
        genotype = random_architecture(spec.space, generator)
        outcome = retrain(genotype, spec, base_dir=ROOT)
        accuracies = {preset: outcome["test_accuracy"]}
        accuracies.update(_retrain_as(genotype, preset, [p for p in protocols or [] if p != preset], []))
        rows.append({"method": "random", "preset": preset, "index": index, "test_accuracy": outcome["test_accuracy"],
                     "test_accuracy_by_protocol": accuracies, "retrain_time_s": outcome["time_s"], "genotype": genotype.to_json()})
    return rows


def memory_table() -> tuple[str, list[dict[str, Any]]]:
    """Parameters and measured peak memory of one training step (batch 64, uniform mixture weights,
    float32, CPU) of each entangled preset's supernet and of its one-weight-per-candidate twin."""
    from bilevel import compile_spec
    from bilevel.nas.footprint import supernet_footprint
    from bilevel.nas.memory import supernet_activation_mb

    rows, table = [], []
    for preset, label in MEMORY_PAIRS.items():
        for mixed in ("entangled", "separate"):
            loaded = load_spec(find_preset(preset), overrides=[f"{ARCH}.space.mixed_op={mixed}"])
            torch.manual_seed(0)
            problem = compile_spec(loaded, "cpu")
            net = problem.lower.modules["net"].module
            weights = problem.upper.modules["arch"].module()
            batch = problem.lower.data.full
            figures = supernet_footprint(net, weights, batch["x"][:64], batch["y"][:64])
            figures.update(preset=preset, mixed_op=mixed, estimate_mib=supernet_activation_mb(problem))
            rows.append(figures)
            table.append([label, mixed, f"{figures['parameters']:,}", f"{figures['peak_step_bytes'] / 2**20:.1f}",
                          f"{figures['estimate_mib']:.1f}"])
    header = ["search space", "supernet", "parameters", "peak of one training step (MiB, measured)",
              "planner's activation estimate (MiB)"]
    return markdown_table(header, table), rows


def step_times(methods: list[str], steps: int, rounds: int = 3) -> dict[str, float]:
    """Median time (ms) of one outer step (weight step + architecture direction + Adam step) per
    method on the preset, timed round-robin after a warm-up so that machine load falls on all alike."""
    from bilevel import build_engine, compile_spec
    from bilevel.runtime.outer import build_outer_optimizer

    setups = {}
    for name in methods:
        method = METHODS[name]
        loaded = load_spec(find_preset(method.preset), overrides=[f"{ARCH}.warmup_steps=0", *method.overrides])
        problem = compile_spec(loaded, "cpu")
        x = problem.fresh(problem.upper.init, requires_grad=True)
        engine = build_engine(method.engine or EXACT)
        setups[name] = [problem, x, engine, engine.init(problem, x), build_outer_optimizer(loaded.spec.levels["upper"].solver, x)]

    def outer_steps(name: str) -> None:
        problem, x, engine, state, optimizer = setups[name]
        for _ in range(steps):
            out = engine.hypergrad(problem, x, state, problem.upper.batch())
            for p, g in zip(x, out.grad):
                p.grad = g
            optimizer.step()
            state = out.state
        setups[name][3] = state

    timed = measure({name: lambda name=name: outer_steps(name) for name in methods}, torch.device("cpu"), 1, rounds)
    return {name: result["median_ms"] / steps for name, result in timed.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="search seeds per method")
    parser.add_argument("--random", type=int, default=5, help="random cells")
    parser.add_argument("--steps", type=int, default=None, help="override run.steps (quick looks)")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help="subset of: " + "; ".join(METHODS))
    parser.add_argument("--retrain-as", nargs="*", default=[], metavar="PRESET",
                        help="also retrain every architecture with these presets' retraining settings (one column each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nas_digits")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also draw the cell found by the first method's first seed here (docs/figures/darts_cell.png)")
    parser.add_argument("--step-times", type=int, default=0, metavar="N",
                        help="only time N outer steps per method, round-robin, and print ms per step")
    parser.add_argument("--memory", action="store_true",
                        help="only measure parameters and the peak memory of one training step of the entangled supernets and their twins")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory:
        table, rows = memory_table()
        print(table)
        payload = {"command": "python benchmarks/nas_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "memory": rows}
        write_json(args.out / "memory.json", payload)
        return payload
    if args.step_times:
        medians = step_times(args.methods, args.step_times)
        reference = "DARTS 1st order" if "DARTS 1st order" in medians else next(iter(medians))
        base = medians[reference]
        print(markdown_table(["method", "ms per outer step (median of 3 rounds)", f"relative to {reference}"],
                             ([name, f"{value:.0f}", f"{value / base:.2f}"] for name, value in medians.items())))
        return {"step_times_ms": medians}
    overrides = [] if args.steps is None else [f"run.steps={args.steps}"]
    rows: list[dict[str, Any]] = []
    for name in args.methods:
        method = METHODS[name]
        for seed in range(args.seeds):
            tag = name.lower().replace(" ", "_").replace(",", "")
            row = search(name, method, seed, overrides, args.out / f"{tag}-seed{seed}", args.retrain_as)
            print(f"{name:22s} seed {seed}: test accuracy {row['test_accuracy']:.4f}, search {row['search_time_s']:.1f}s,"
                  f" retrain {row['retrain_time_s']:.1f}s", flush=True)
            rows.append(row)
    presets = list(dict.fromkeys(METHODS[name].preset for name in args.methods))
    randoms = {preset: random_cells(args.random, overrides, preset, args.retrain_as) for preset in presets}
    for preset, cells in randoms.items():
        for row in cells:
            print(f"random ({preset}) {row['index']}: test accuracy {row['test_accuracy']:.4f}", flush=True)

    summary, tables = [], []
    for preset in presets:
        protocols = [preset] + [p for p in args.retrain_as if p != preset]
        cells = randoms[preset]
        # without random cells (--random 0) there is nothing to compare with: no column, None in the JSON
        random_mean, random_std = _mean_std([r["test_accuracy"] for r in cells]) if cells else (None, None)
        table = []
        for name in [n for n in args.methods if METHODS[n].preset == preset]:
            mine = [r for r in rows if r["method"] == name]
            mean, std = _mean_std([r["test_accuracy"] for r in mine])
            seconds = statistics.fmean(r["search_time_s"] for r in mine)
            beats = None if random_mean is None else mean > random_mean
            by_protocol = {p: _mean_std([r["test_accuracy_by_protocol"][p] for r in mine]) for p in protocols}
            summary.append({"method": name, "preset": preset, "runs": len(mine), "test_accuracy_mean": mean,
                            "test_accuracy_std": std, "by_protocol": by_protocol, "search_time_s_mean": seconds,
                            "beats_random_mean": beats})
            table.append([f"{name} ({len(mine)} seeds)"] + [f"{m:.4f} +- {s:.4f}" for m, s in by_protocol.values()]
                         + [f"{seconds:.1f}"] + ([] if beats is None else ["yes" if beats else "no"]))
        header = ["method"] + [f"test accuracy, retrained as {p} (mean +- std)" for p in protocols] + ["search time per run (s)"]
        if random_mean is not None:
            cells_by = [_mean_std([r["test_accuracy_by_protocol"][p] for r in cells]) for p in protocols]
            table.append([f"random ({len(cells)})"] + [f"{m:.4f} +- {s:.4f}" for m, s in cells_by] + ["-", "-"])
            header.append(f"beats the random mean ({random_mean:.4f})")
        tables.append(f"{preset}\n\n" + markdown_table(header, table))
    print()
    print("\n\n".join(tables))
    if all(not cells for cells in randoms.values()):
        print("(no random cells drawn: --random 0; nothing to compare with)")
    payload = {
        "command": "python benchmarks/nas_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "summary": summary,
        "random": {preset: {"mean": _mean_std([r["test_accuracy"] for r in c])[0] if c else None,
                            "std": _mean_std([r["test_accuracy"] for r in c])[1] if c else None, "cells": c}
                   for preset, c in randoms.items()},
        "runs": rows,
    }
    write_json(args.out / "results.json", payload)
    if args.figure is not None and rows:
        first = rows[0]
        space = _architecture(first["preset"], list(METHODS[first["method"]].overrides)).space
        title = f"{first['method']}, seed {first['seed']}: test accuracy {first['test_accuracy']:.4f}"
        draw_architecture(architecture_from_json(first["genotype"], space), space, args.figure, title=title)
    print(f"\nfull figures in {args.out / 'results.json'}")
    return payload


if __name__ == "__main__":
    main()
