"""The distillation comparison of the README: for 1 and 10 images per class, every method's
distilled set against random real subsets of the same size, each evaluated by fresh, randomly
initialized MLPs (mean +- std over 5 models). Prints a Markdown table and writes JSON.

    python -m problems.distill.compare                                   # the README's table
    python -m problems.distill.compare --ipc 1 --models 3 --steps 100    # quicker
    python -m problems.distill.compare --methods kip --json kip.json
    python -m problems.distill.compare --commands                        # the bilevel run command of every row

Each row is the report of one ``bilevel run`` of the method's preset
(problems/distill/<preset>.yaml) with the synthetic set resized to ``ipc`` images per class by
``--set`` overrides: the script runs exactly that command through the Python API, and
``--commands`` prints the command lines instead of running them. The random subsets and the
evaluation models use the same seeds for every method, so the columns are paired. The whole real
pool, the reference, does not depend on the size of the synthetic set: each method's run at the
first ``ipc`` evaluates it (``report_kwargs.full_pool=true``), and the table gives it once per
method."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bilevel import run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import format_cell, markdown_table, run_command  # noqa: E402

__all__ = ["METHODS", "commands", "compare", "method_overrides", "transfer", "transfer_overrides"]

METHODS = {
    "implicit": ("distill/digits_implicit", "linear student + L2, implicit (CG) hypergradient"),
    "unrolled": ("distill/digits_unrolled", "MLP student, 20 unrolled SGD steps, soft labels + learned lr"),
    "kip": ("distill/digits_kip", "KIP: NNGP kernel ridge regression, closed form, learned labels"),
}


def method_overrides(method: str, ipc: int, steps: int, models: int, device: str, full_pool: bool = False) -> list[str]:
    """Spec overrides resizing a method's preset to ``ipc`` images per class; with ``full_pool``
    the whole real pool is evaluated as a reference as well (``report_kwargs.full_pool``)."""
    n = 10 * ipc
    out = [f"levels.upper.variables.images.shape=[{n}, 1, 8, 8]", f"levels.upper.variables.images.init_kwargs.per_class={ipc}",
           f"run.steps={steps}", f"run.device={device}", f"report_kwargs.models={models}",
           *(["report_kwargs.full_pool=true"] if full_pool else []), "run.checkpoint_every=null"]
    if method == "unrolled":
        out += [f"levels.upper.variables.labels.shape=[{n}, 10]", f"levels.upper.variables.labels.init_kwargs.per_class={ipc}"]
    if method == "kip":
        out += [f"levels.upper.variables.targets.shape=[{n}, 10]", f"levels.upper.variables.targets.init_kwargs.per_class={ipc}",
                f"levels.lower.variables.alpha.shape=[{n}, 10]"]
    return out


def transfer_overrides(ipc: int, steps: int, models: int, device: str) -> list[str]:
    """Spec overrides resizing the KRR-ST preset to ``ipc`` images per class."""
    n = 10 * ipc
    return [f"levels.upper.variables.images.shape=[{n}, 1, 8, 8]", f"levels.upper.variables.images.init_kwargs.per_class={ipc}",
            f"levels.upper.variables.targets.shape=[{n}, 32]", f"levels.upper.variables.targets.init_kwargs.per_class={ipc}",
            f"levels.lower.variables.alpha.shape=[{n}, 32]", f"run.steps={steps}", f"run.device={device}",
            f"report_kwargs.models={models}", "run.checkpoint_every=null"]


def commands(ipcs: list[int], methods: list[str], models: int, steps: int, device: str, transfer: bool) -> list[str]:
    """The ``bilevel run`` command line behind every row of the tables."""
    lines = [run_command(METHODS[method][0], method_overrides(method, ipc, steps, models, device, full_pool=ipc == ipcs[0]),
                         out=f"runs/distill-{method}-ipc{ipc}")
             for ipc in ipcs for method in methods]
    if transfer:
        lines += [run_command("distill/digits_krr_st", transfer_overrides(ipc, steps, models, device), out=f"runs/distill-krr-st-ipc{ipc}")
                  for ipc in ipcs]
    return lines


def compare(ipcs: list[int], methods: list[str], models: int, steps: int, device: str, log: Any = print) -> dict[str, Any]:
    """One ``bilevel run`` of each method's preset per number of images per class; a row of
    reports per ``ipc``, with the command line that reproduces each. The whole real pool is
    evaluated by each method's run at the first ``ipc`` (its row holds ``"<method> whole real
    pool"``)."""
    results: dict[str, Any] = {"rows": [], "settings": {"ipc": ipcs, "methods": methods, "models": models, "steps": steps}}
    for ipc in ipcs:
        row: dict[str, Any] = {"ipc": ipc}
        for method in methods:
            preset, _ = METHODS[method]
            full_pool = ipc == ipcs[0]
            overrides = method_overrides(method, ipc, steps, models, device, full_pool)
            began = time.perf_counter()
            outcome = run(load_spec(find_preset(preset), overrides=overrides), out=tempfile.mkdtemp(prefix=f"distill-{method}-{ipc}-"),
                          progress=False)
            report = outcome.result["report"]
            row[f"{method} random real subset"] = report["random_subset_accuracy"]
            row[method] = report["distilled_accuracy"]
            row[f"{method} (own lower solution)"] = report["lower_solution_test_accuracy"]
            if full_pool:
                row[f"{method} whole real pool"] = report["full_pool_accuracy"]
            row[f"{method} wall time s"] = time.perf_counter() - began
            row[f"{method} command"] = run_command(preset, overrides)
            log(f"ipc {ipc} {method}: distilled {report['distilled_accuracy']['mean']:.3f} +- {report['distilled_accuracy']['std']:.3f}"
                f"  random {report['random_subset_accuracy']['mean']:.3f} +- {report['random_subset_accuracy']['std']:.3f}"
                f"  ({row[f'{method} wall time s']:.0f} s)")
        results["rows"].append(row)
    return results


def transfer(ipcs: list[int], models: int, steps: int, device: str, log: Any = print) -> list[dict[str, Any]]:
    """KRR-ST: linear-probe accuracy after pretraining on the distilled set vs alternatives."""
    rows = []
    for ipc in ipcs:
        overrides = transfer_overrides(ipc, steps, models, device)
        outcome = run(load_spec(find_preset("distill/digits_krr_st"), overrides=overrides), out=tempfile.mkdtemp(), progress=False)
        report = outcome.result["report"]
        rows.append({"ipc": ipc, **{k: v for k, v in report.items() if k.endswith("probe_accuracy")},
                     "command": run_command("distill/digits_krr_st", overrides)})
        log(f"KRR-ST ipc {ipc}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in rows[-1].items() if isinstance(v, dict)))
    return rows


def table(results: dict[str, Any]) -> str:
    """One row per (images per class, method): the distilled set and random real subsets of the
    same size, evaluated the same way (the method's evaluation loss), and the method's own lower
    solution (the trained student, or the kernel regressor) on the synthetic set; then the whole
    real pool once per method, evaluated as its rows are."""
    columns = ["images per class", "method", "distilled set", "random real subset", "own lower solution"]
    text = markdown_table(columns, ([row["ipc"], METHODS[method][1], *(format_cell(row[key]) for key in
                                     (method, f"{method} random real subset", f"{method} (own lower solution)"))]
                                    for row in results["rows"] for method in results["settings"]["methods"]))
    first = results["rows"][0]
    pool = markdown_table(["whole real pool (the reference), evaluated as for", "test accuracy"],
                          ([METHODS[method][1], format_cell(first[f"{method} whole real pool"])]
                           for method in results["settings"]["methods"] if f"{method} whole real pool" in first))
    return f"{text}\n\n{pool}"


def transfer_table(rows: list[dict[str, Any]]) -> str:
    names = [("distilled_probe_accuracy", "KRR-ST distilled"), ("random_real_subset_probe_accuracy", "random real subset"),
             ("no_pretraining_probe_accuracy", "no pretraining"), ("teacher_probe_accuracy", "teacher (full pool)")]
    return markdown_table(["images per class", *(label for _, label in names)],
                          ([row["ipc"], *(format_cell(row[key]) for key, _ in names)] for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10], help="images per class (default: 1 10)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--models", type=int, default=5, help="fresh evaluation models per set (default 5)")
    parser.add_argument("--steps", type=int, default=300, help="outer steps of each distillation (default 300)")
    parser.add_argument("--transfer", action="store_true", help="also the KRR-ST transfer table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--commands", action="store_true", help="print the bilevel run command of every row, run nothing")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args(argv)
    if args.commands:
        print("\n".join(commands(args.ipc, args.methods, args.models, args.steps, args.device, args.transfer)))
        return 0
    results = compare(args.ipc, args.methods, args.models, args.steps, args.device)
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
                              "device": args.device, "command": "python -m problems.distill.compare " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = table(results)
    if args.transfer:
        results["transfer"] = transfer(args.ipc, args.models, args.steps, args.device)
        text += "\n\n" + transfer_table(results["transfer"])
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
