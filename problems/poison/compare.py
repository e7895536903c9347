"""The poisoning comparison of the README, over seeds: availability poisons against clean
training, random noise (uniform in the epsilon ball, and random +-epsilon signs) and label flips
with the same budget; the optimized backdoor trigger against fixed triggers with the same budget
(the BadNets corner patch, a checkerboard and a random sign pattern). Each seed changes the data
split, the poisoned examples, the noise and the victims' initializations. Prints Markdown tables
(mean +- std over seeds) and writes JSON.

    python -m problems.poison.compare                       # the README's tables (3 seeds)
    python -m problems.poison.compare --seeds 0 --steps 40  # quicker
    python -m problems.poison.compare --engine unrolled     # back-gradient through the training steps
    python -m problems.poison.compare --commands            # the bilevel run command of every run

Every row of every table is the report of one ``bilevel run`` of a preset
(``poison/digits_availability``, ``poison/digits_backdoor``) with its seed set by ``--set``
overrides: the script runs exactly that command through the Python API, and ``--commands`` prints
the command lines instead of running them. Every run also checks its budget on the poisons it
writes; the script fails if one does not."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bilevel import run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.engines import engine_config  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import markdown_table, run_command  # noqa: E402
from problems.poison.evaluate import AVAILABILITY_ROWS, BACKDOOR_ROWS  # noqa: E402

__all__ = ["attack_overrides", "run_attack", "seed_overrides"]


def seed_overrides(preset: str, seed: int) -> list[str]:
    """The seed of the data (split and poisoned examples), of the noise and of the run. The data
    arguments are one YAML anchor in the presets (the data sources, the init function and the
    report share it), so one override inside it sets the seed of every copy."""
    return [f"levels.lower.data.kwargs.seed={seed}", f"run.seed={seed}", f"report_kwargs.noise_seed={seed}"]


def attack_overrides(preset: str, seed: int, steps: int, models: int, device: str) -> list[str]:
    """All the ``--set`` overrides of one run of the comparison."""
    return [*seed_overrides(preset, seed), f"run.steps={steps}", f"report_kwargs.models={models}", f"run.device={device}",
            "run.checkpoint_every=null"]


def run_attack(preset: str, seed: int, steps: int, models: int, device: str, engine: str | None) -> dict[str, Any]:
    """The report of ``bilevel run PRESET --set ...`` (the overrides of :func:`attack_overrides`)."""
    config = None if engine is None else engine_config(engine)
    loaded = load_spec(find_preset(preset), overrides=attack_overrides(preset, seed, steps, models, device))
    report = run(loaded, engine=config, out=tempfile.mkdtemp(), progress=False).result["report"]
    if not report["budget_respected"]:
        raise AssertionError(f"{preset} seed {seed}: budget exceeded: {report}")
    return report


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _mlp(report: dict[str, Any], key: str) -> float | None:
    value = report.get(key)
    return value["mean"] if isinstance(value, dict) else None


def availability_table(reports: list[dict[str, Any]]) -> str:
    rows = []
    for key, label in AVAILABILITY_ROWS.items():
        linear = [r[f"{key}_linear_accuracy"] for r in reports]
        mlp = [m for r in reports if (m := _mlp(r, f"{key}_mlp_accuracy")) is not None]
        rows.append([label, _summary(linear), _summary(mlp) if mlp else ""])
    return markdown_table(["training set", "linear victim: test accuracy", "MLP victims: test accuracy"], rows)


def backdoor_table(reports: list[dict[str, Any]]) -> str:
    rows = []
    for key, label in BACKDOOR_ROWS.items():
        cells = [label, _summary([r[f"{key}_linear_accuracy"] for r in reports]), _summary([r[f"{key}_linear_attack_success"] for r in reports])]
        for metric in ("accuracy", "attack_success"):
            mlp = [m for r in reports if (m := _mlp(r, f"{key}_mlp_{metric}")) is not None]
            cells.append(_summary(mlp) if mlp else "")
        rows.append(cells)
    table = markdown_table(["trigger", "linear: clean accuracy", "linear: attack success", "MLP: clean accuracy", "MLP: attack success"], rows)
    return table + f"\n| none (clean training, optimized trigger at test time) | | {_summary([r['no_poisoning_linear_attack_success'] for r in reports])} | | |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="outer steps (default 100, as the presets)")
    parser.add_argument("--models", type=int, default=3, help="MLP victims per training set (default 3)")
    parser.add_argument("--attacks", nargs="+", default=["availability", "backdoor"], choices=["availability", "backdoor"])
    parser.add_argument("--engine", default=None, help="engine kind (default: the planner's choice, implicit)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--commands", action="store_true", help="print the bilevel run command of every run, run nothing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    commands = {attack: [run_command(f"poison/digits_{attack}", attack_overrides(f"poison/digits_{attack}", seed, args.steps, args.models,
                                                                                   args.device), args.engine, f"runs/poison-{attack}-seed{seed}")
                         for seed in args.seeds] for attack in args.attacks}
    if args.commands:
        print("\n".join(line for lines in commands.values() for line in lines))
        return 0
    results: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json)}, "commands": commands}
    text = []
    for attack in args.attacks:
        preset = f"poison/digits_{attack}"
        reports = []
        for seed in args.seeds:
            reports.append(run_attack(preset, seed, args.steps, args.models, args.device, args.engine))
            print(f"{attack} seed {seed}: done", file=sys.stderr)
        results[attack] = reports
        budget = f"fraction {reports[0]['budget_fraction']:g}, epsilon {reports[0]['budget_epsilon']:g}"
        table = availability_table(reports) if attack == "availability" else backdoor_table(reports)
        text.append(f"{attack} ({budget}; {len(args.seeds)} seeds; largest perturbation used"
                    f" {max(r['max_perturbation'] for r in reports):.4f})\n\n{table}")
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "command": "python -m problems.poison.compare " + " ".join(argv if argv is not None else sys.argv[1:])}
    print("\n\n".join(text))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
