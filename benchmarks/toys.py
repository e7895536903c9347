"""Distance to the known optimum vs iterations on the papers' toy problems, for the engines that
target them: LV-HBA on its coupled-constraint toy, the value-function penalty (V-PBGD) on its
nonconvex toy. Prints markdown tables (they are the ones in the problems' READMEs).

    python benchmarks/toys.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bilevel import run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402
from problems.constrained_toy import relative_error  # noqa: E402
from problems.nonconvex_toy import hyper_objective_minima  # noqa: E402


def lv_hba_table(checkpoints=(100, 500, 1000, 2000, 5000, 20000)) -> str:
    """One run of the longest horizon; nothing in LV-HBA depends on the horizon (c_k depends on k
    only), so the x after k steps is the result of a k-step run."""
    reference = {100: 0.565, 500: 0.278, 1000: 0.179, 2000: 0.078, 5000: 0.025, 20000: 0.0146}
    errors: dict[int, float] = {}

    def record(step: int, x, _y) -> None:
        if step in reference:
            errors[step] = relative_error(x[0])

    loaded = load_spec(find_preset("constrained_toy/lv_hba"), overrides=[f"run.steps={max(checkpoints)}", "run.checkpoint_every=null"])
    run(loaded, out=tempfile.mkdtemp(), progress=False, on_step=record)
    return markdown_table(["iterations", "relative error of x", "reference"], ([k, f"{errors[k]:.4f}", reference[k]] for k in checkpoints))


def v_pbgd_table(starts=(0.2, 0.7, 1.0, 1.6, 2.2, 2.5, 2.9)) -> str:
    minima = hyper_objective_minima(30001)
    rows = []
    for gamma, steps in ((10.0, 1000), (100.0, 6000)):
        finals, settles = [], []
        for x0 in starts:
            loaded = load_spec(find_preset("nonconvex_toy/v_pbgd"), overrides=[
                f"levels.upper.variables.x.init={x0}", f"engine.gamma_max={gamma}", f"run.steps={steps}"])
            xs: list[float] = []
            result = run(loaded, out=tempfile.mkdtemp(), progress=False, on_step=lambda _k, x, _y: xs.append(float(x[0])))
            x = float(result.x[0])
            nearest = min(minima, key=lambda m: abs(m - x))
            finals.append(f"{x0} -> {x:.3f} ({abs(x - nearest):.3f})")
            settles.append(next(k + 1 for k in range(len(xs)) if all(abs(v - x) <= 0.01 for v in xs[k:])))
        rows.append([f"{gamma:g}", steps, "; ".join(finals), f"{statistics.median(settles):.0f}"])
    columns = ["gamma", "iterations", "start -> final x (distance to the nearest minimum)", "median iterations to settle"]
    return markdown_table(columns, rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("## LV-HBA, coupled-constraint toy\n")
    print(lv_hba_table())
    print("\n## V-PBGD, nonconvex toy\n")
    print(v_pbgd_table())
