"""STN against the searches users run instead, on the same tuning problem: the MLP on digits with
input and hidden dropout rates and an L2 strength (problems/hpo, preset ``hpo/mlp_stn``).

* STN: one run of the preset (``run.steps`` outer steps, T_train = 2 training steps each).
* Random search: ``--trials`` trainings of the plain MLP, hyperparameters drawn from the ranges the
  spec declares (uniform, log-uniform for ``log: true``), each trained for as many steps as STN
  trains its model in total (same optimizer, batch and learning rate); the best trial by
  validation loss gives the test loss.
* Optuna TPE: the same trainings, proposed by the TPE sampler, for at most ``--trials`` trials and
  at most the random search's wall time (equal wall-clock budget).
* The same two searches cut at STN's wall time: the best trial among those finished by then.

Prints one table (validation and test loss reached, wall time, number of trainings) and writes
the full figures as JSON. All methods run in one process, one after the other, on one thread.

    python benchmarks/hpo_search.py --trials 30 --seeds 0,1,2 --json hpo_search.json
    python benchmarks/hpo_search.py --trials 0 --no-optuna --figure docs/figures/stn_schedule.png   # the docs' figure
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import write_json  # noqa: E402
from bilevel import run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from bilevel.sweeps import draw_hyperparameters as draw_random  # noqa: E402
from bilevel.sweeps import hyperparameter_space as search_space  # noqa: E402
from bilevel.sweeps import suggest_hyperparameters as suggest  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402
from problems.hpo.digits import train_fixed  # noqa: E402

PRESET = "hpo/mlp_stn"


def _best(trials: list[dict[str, Any]], until: float | None = None) -> dict[str, Any] | None:
    done = [t for t in trials if until is None or t["finished_s"] <= until]
    return min(done, key=lambda t: t["val_loss"]) if done else None


def run_stn(steps: int | None, seed: int) -> dict[str, Any]:
    overrides = [f"run.seed={seed}", "run.checkpoint_every=null"] + ([f"run.steps={steps}"] if steps else [])
    loaded = load_spec(find_preset(PRESET), overrides=overrides)
    out_dir = tempfile.mkdtemp(prefix="stn-")
    began = time.perf_counter()
    result = run(loaded, device="cpu", out=out_dir, overwrite=True, progress=False)
    wall = time.perf_counter() - began
    spec = loaded.spec
    lower = next(level for level in spec.levels.values() if level.parent is not None)
    engine = result.result["engine_config"]
    training_steps = engine.get("warmup_steps", 0) + spec.run.steps * lower.solver.steps
    report = result.result["report"]
    return {
        "method": "STN", "val_loss": report["val_loss"], "test_loss": report["test_loss"],
        "test_accuracy": report["test_accuracy"], "wall_time_s": wall, "trainings": 1,
        "hyperparameters": result.result["upper_variables"], "training_steps": training_steps,
        "batch_size": lower.data.batch_size, "lr": lower.solver.lr, "out_dir": out_dir,
    }


def random_search(space: dict[str, Any], trials: int, steps: int, batch: int, lr: float, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    began, out = time.perf_counter(), []
    for index in range(trials):
        point = draw_random(space, rng)
        figures = train_fixed(**point, steps=steps, batch_size=batch, lr=lr, seed=seed + index)
        out.append({"hyperparameters": point, **figures, "finished_s": time.perf_counter() - began})
    return out


def tpe_search(space: dict[str, Any], trials: int, timeout: float, steps: int, batch: int, lr: float, seed: int) -> list[dict[str, Any]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    began, out = time.perf_counter(), []

    def objective(trial: Any) -> float:
        point = suggest(trial, space)
        figures = train_fixed(**point, steps=steps, batch_size=batch, lr=lr, seed=seed + trial.number)
        out.append({"hyperparameters": point, **figures, "finished_s": time.perf_counter() - began})
        return figures["val_loss"]

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials, timeout=timeout)
    return out


def _row(method: str, best: dict[str, Any] | None, wall: float, trainings: int) -> dict[str, Any]:
    if best is None:
        return {"method": method, "val_loss": None, "test_loss": None, "test_accuracy": None, "wall_time_s": wall, "trainings": trainings}
    return {"method": method, "val_loss": best["val_loss"], "test_loss": best["test_loss"], "test_accuracy": best["test_accuracy"],
            "wall_time_s": wall, "trainings": trainings, "hyperparameters": best["hyperparameters"]}


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def compare(trials: int, steps: int | None, seed: int, optuna: bool = True) -> dict[str, Any]:
    """STN, then random search and TPE on the same problem; one table's rows and every trial."""
    space = search_space(load_spec(find_preset(PRESET)))
    stn = run_stn(steps, seed)
    steps_per_trial, batch, lr = stn["training_steps"], stn["batch_size"] or 100, stn["lr"]
    print(f"seed {seed}: STN done in {stn['wall_time_s']:.1f}s; each search trial trains {steps_per_trial} steps"
          f" (batch {batch}, Adam lr {lr})", file=sys.stderr)
    rand = random_search(space, trials, steps_per_trial, batch, lr, seed)
    rand_wall = rand[-1]["finished_s"] if rand else 0.0
    rows = [
        {k: v for k, v in stn.items() if k not in ("training_steps", "batch_size", "lr", "out_dir")},
        _row(f"random search, {trials} trials", _best(rand), rand_wall, len(rand)),
    ]
    tpe: list[dict[str, Any]] = []
    if optuna:
        tpe = tpe_search(space, trials, rand_wall, steps_per_trial, batch, lr, seed)
        rows.append(_row("Optuna TPE, random search's wall time", _best(tpe), tpe[-1]["finished_s"] if tpe else 0.0, len(tpe)))
    cut = stn["wall_time_s"]
    for name, trials_run in (("random search", rand), ("Optuna TPE", tpe if optuna else None)):
        if trials_run is None:
            continue
        within = [t for t in trials_run if t["finished_s"] <= cut]
        used = within[-1]["finished_s"] if within else 0.0
        rows.append(_row(f"{name}, STN's wall time", _best(within), used, len(within)))
    return {"seed": seed, "trial_training_steps": steps_per_trial, "rows": rows, "random_trials": rand, "tpe_trials": tpe,
            "stn_out": stn["out_dir"]}


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(["method", "val loss", "test loss", "test accuracy", "wall time", "trainings"],
                          ([row["method"], *(_fmt(row[key], ".4f") for key in ("val_loss", "test_loss", "test_accuracy")),
                            f"{row['wall_time_s']:.1f} s", row["trainings"]] for row in rows))


def summary(runs: list[dict[str, Any]]) -> str:
    """Per method over seeds: mean (min .. max) of the test loss, mean wall time, and on how many
    seeds STN's test loss was at most the method's."""
    methods = [row["method"] for row in runs[0]["rows"]]
    rows = []
    stn = [r["rows"][0]["test_loss"] for r in runs]
    for index, method in enumerate(methods):
        losses = [r["rows"][index]["test_loss"] for r in runs]
        walls = [r["rows"][index]["wall_time_s"] for r in runs]
        known = [v for v in losses if v is not None]
        spread = f"{sum(known) / len(known):.4f} ({min(known):.4f} .. {max(known):.4f})" if known else "n/a"
        wins = sum(a <= b for a, b in zip(stn, losses) if b is not None)
        rows.append([method, spread, f"{sum(walls) / len(walls):.1f} s", "" if index == 0 else f"{wins} of {len(known)}"])
    return markdown_table(["method", "test loss, mean (min .. max)", "wall time, mean", "STN's test loss <= it"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="random-search trials (and TPE's cap)")
    parser.add_argument("--steps", type=int, default=None, help="STN outer steps (default: the preset's run.steps)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds: one full comparison each")
    parser.add_argument("--no-optuna", action="store_true", help="skip the TPE search")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--figure", type=Path, default=None,
                        help="copy the first seed's STN schedule plot (hyperparameters.png) here, e.g. docs/figures/stn_schedule.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs.append(compare(args.trials, args.steps, seed, not args.no_optuna))
        runs[-1]["table"] = table(runs[-1]["rows"])
        print(f"\nseed {seed}\n{runs[-1]['table']}")
    if args.figure is not None:
        shutil.copyfile(Path(runs[0]["stn_out"]) / "hyperparameters.png", args.figure)
    payload: dict[str, Any] = {"preset": PRESET, "trials": args.trials, "torch": torch.__version__, "runs": runs}
    if len(runs) > 1:
        payload["summary"] = summary(runs)
        print(f"\nover seeds {args.seeds}\n{payload['summary']}")
    if args.json is not None:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
