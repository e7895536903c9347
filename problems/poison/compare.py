"""The poisoning comparison of the README, over seeds: availability poisons against clean
training, random noise (uniform in the epsilon ball, and random +-epsilon signs) and label flips
with the same budget; the optimized backdoor trigger against fixed triggers with the same budget
(the BadNets corner patch, a checkerboard and a random sign pattern); and the trigger optimized
through a contrastive (SimCLR) victim against the same fixed triggers and against the trigger
optimized through the supervised victim, all measured by linear probes of fresh SimCLR victims.
Each seed changes the data split, the poisoned examples, the noise and the victims'
initializations. Prints Markdown tables (mean +- std over seeds) and writes JSON.

    python -m problems.poison.compare                       # the README's tables (3 seeds)
    python -m problems.poison.compare --seeds 0 --steps 40  # quicker
    python -m problems.poison.compare --engine unrolled     # back-gradient through the training steps
    python -m problems.poison.compare --attacks contrastive_backdoor   # the contrastive table
    python -m problems.poison.compare --commands            # the bilevel run command of every run

Every row of every table is the report of one ``bilevel run`` of a preset
(``poison/digits_availability``, ``poison/digits_backdoor``, ``poison/digits_contrastive_backdoor``)
with its seed set by ``--set`` overrides: the script runs exactly that command through the Python
API, and ``--commands`` prints the command lines instead of running them. The contrastive table's
row of the supervised victim's trigger is the trigger of the ``poison/digits_backdoor`` run of the
same seed, evaluated by ``contrastive_attack`` on the contrastive preset's poisoned images. Every
run also checks its budget on the poisons it writes; the script fails if one does not."""

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
from problems.poison.contrastive_report import CONTRASTIVE_ROWS, contrastive_attack  # noqa: E402
from problems.poison.data import PoisonData  # noqa: E402
from problems.poison.evaluate import AVAILABILITY_ROWS, BACKDOOR_ROWS  # noqa: E402

__all__ = ["attack_overrides", "run_attack", "seed_overrides"]

ATTACKS = ("availability", "backdoor", "contrastive_backdoor")
STEPS = {"availability": 100, "backdoor": 100, "contrastive_backdoor": 200}
"""The presets' outer steps (the default of --steps)."""


def seed_overrides(preset: str, seed: int) -> list[str]:
    """The seed of the data (split and poisoned examples), of the noise and of the run. The data
    arguments are one YAML anchor in the presets (the data sources, the init function and the
    report share it), so one override inside it sets the seed of every copy."""
    return [f"levels.lower.data.kwargs.seed={seed}", f"run.seed={seed}", f"report_kwargs.noise_seed={seed}"]


def attack_overrides(preset: str, seed: int, steps: int, models: int, device: str, victim_steps: int | None = None,
                     epsilon: float | None = None) -> list[str]:
    """All the ``--set`` overrides of one run of the comparison (``victim_steps``: the SimCLR
    steps of the contrastive report's victims; ``epsilon``: the budget's epsilon instead of the
    preset's, set inside the data arguments' anchor, so in every copy)."""
    extra = [] if victim_steps is None or "contrastive" not in preset else [f"report_kwargs.steps={victim_steps}"]
    if epsilon is not None:
        extra.append(f"levels.lower.data.kwargs.budget.epsilon={epsilon}")
    return [*seed_overrides(preset, seed), f"run.steps={steps}", f"report_kwargs.models={models}", f"run.device={device}",
            "run.checkpoint_every=null", *extra]


def run_attack(preset: str, seed: int, steps: int, models: int, device: str, engine: str | None,
               victim_steps: int | None = None, with_trigger: bool = False, epsilon: float | None = None) -> Any:
    """The report of ``bilevel run PRESET --set ...`` (the overrides of :func:`attack_overrides`);
    with ``with_trigger``, (report, the run's final trigger)."""
    config = None if engine is None else engine_config(engine)
    loaded = load_spec(find_preset(preset), overrides=attack_overrides(preset, seed, steps, models, device, victim_steps, epsilon))
    result = run(loaded, engine=config, out=tempfile.mkdtemp(), progress=False).result
    report = result["report"]
    if not report["budget_respected"]:
        raise AssertionError(f"{preset} seed {seed}: budget exceeded: {report}")
    if with_trigger:
        return report, torch.tensor(result["upper_variables"]["trigger"], dtype=torch.float32)
    return report


def contrastive_run(seed: int, steps: int, models: int, device: str, engine: str | None, victim_steps: int | None,
                    epsilon: float | None = None) -> dict[str, Any]:
    """The contrastive preset's report for ``seed``, with the supervised victim's trigger (the
    ``poison/digits_backdoor`` run of the same seed and epsilon) evaluated on the same SimCLR
    victims' setting: ``supervised_trigger_*`` (on the contrastive victims) and
    ``supervised_victim_*`` (the supervised run's own linear victim)."""
    preset = "poison/digits_contrastive_backdoor"
    report = run_attack(preset, seed, steps, models, device, engine, victim_steps, epsilon=epsilon)
    supervised, trigger = run_attack("poison/digits_backdoor", seed, STEPS["backdoor"], 0, device, None, with_trigger=True,
                                     epsilon=epsilon)
    loaded = load_spec(find_preset(preset), overrides=attack_overrides(preset, seed, steps, models, device, victim_steps, epsilon))
    settings = PoisonData.model_validate(loaded.spec.report_kwargs["data"])
    kwargs = loaded.spec.report_kwargs
    scores = contrastive_attack(settings, trigger.clamp(-1, 1), models=models, steps=kwargs.get("steps", 800), mu=kwargs.get("mu", 1e-2))
    return {**report, **{f"supervised_trigger_{k}": v for k, v in scores.items()},
            "supervised_victim_accuracy": supervised["optimized_trigger_linear_accuracy"],
            "supervised_victim_attack_success": supervised["optimized_trigger_linear_attack_success"]}


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


def contrastive_table(reports: list[dict[str, Any]]) -> str:
    def cell(report: dict[str, Any], key: str) -> float | None:
        value = report.get(key)
        return value["mean"] if isinstance(value, dict) else value

    def summary(key: str) -> str:
        values = [v for r in reports if (v := cell(r, key)) is not None]
        return _summary(values) if values else ""

    rows = [[label, summary(f"{key}_accuracy"), summary(f"{key}_attack_success")] for key, label in CONTRASTIVE_ROWS.items()]
    rows.insert(1, ["trigger optimized through the supervised victim (poison/digits_backdoor)",
                    summary("supervised_trigger_accuracy"), summary("supervised_trigger_attack_success")])
    rows.append(["none (clean training, optimized trigger at test time)", summary("no_poisoning_accuracy"),
                 summary("no_poisoning_attack_success")])
    table = markdown_table(["trigger", "SimCLR victims: clean probe accuracy", "SimCLR victims: attack success"], rows)
    return (table + "\n\nFor reference, the supervised trigger on the supervised (linear) victim it was optimized through:"
            f" clean accuracy {summary('supervised_victim_accuracy')}, attack success {summary('supervised_victim_attack_success')}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default: the presets', 100, 100 and 200)")
    parser.add_argument("--models", type=int, default=None,
                        help="MLP victims per training set (default 3), SimCLR victims per trigger for the contrastive attack (default 2)")
    parser.add_argument("--victim-steps", type=int, default=None, help="SimCLR steps of each contrastive victim (default: the preset's 800)")
    parser.add_argument("--attacks", nargs="+", default=["availability", "backdoor"], choices=list(ATTACKS))
    parser.add_argument("--epsilon", type=float, default=None, help="the budget's epsilon in every run (default: each preset's)")
    parser.add_argument("--engine", default=None, help="engine kind (default: the planner's choice, implicit)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--commands", action="store_true", help="print the bilevel run command of every run, run nothing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    def steps(attack: str) -> int:
        return args.steps if args.steps is not None else STEPS[attack]

    def models(attack: str) -> int:
        return args.models if args.models is not None else (2 if attack == "contrastive_backdoor" else 3)

    commands = {attack: [run_command(f"poison/digits_{attack}", attack_overrides(f"poison/digits_{attack}", seed, steps(attack), models(attack),
                                                                                   args.device, args.victim_steps, args.epsilon), args.engine,
                                     f"runs/poison-{attack}-seed{seed}")
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
            if attack == "contrastive_backdoor":
                reports.append(contrastive_run(seed, steps(attack), models(attack), args.device, args.engine, args.victim_steps,
                                               args.epsilon))
            else:
                reports.append(run_attack(preset, seed, steps(attack), models(attack), args.device, args.engine,
                                          epsilon=args.epsilon))
            print(f"{attack} seed {seed}: done", file=sys.stderr)
        results[attack] = reports
        budget = f"fraction {reports[0]['budget_fraction']:g}, epsilon {reports[0]['budget_epsilon']:g}"
        tables = {"availability": availability_table, "backdoor": backdoor_table, "contrastive_backdoor": contrastive_table}
        table = tables[attack](reports)
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
