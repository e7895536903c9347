"""Search cost on the GPU preset (`nas/cifar10`): time per epoch and peak memory, DARTS with and
without partial channels (PC-DARTS, K = 4, with edge normalization), first and second order.

Each configuration runs the preset through `bilevel.run` (warm-up steps, then timed steps, CUDA
synchronized at both ends). The peak memory is the search's: `torch.cuda.max_memory_allocated` is
reset when the timed steps begin and read, in the step callback, when they end, before the run's
final evaluation and report.
Time per epoch is the time per outer step times the steps of one pass over the 25k training half
at the preset's batch size (391). CIFAR-10 is read from CIFAR10_ROOT when set, else synthetic
images of the same shape (the cost is the same). Prints one table last and writes JSON.

    CIFAR10_ROOT=/data/cifar-10-batches-py python benchmarks/nas_gpu.py
    python benchmarks/nas_gpu.py --steps 5 --warmup 1 --device cpu --small   # a CPU smoke run of the script
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bilevel  # noqa: E402
from benchmarks._common import write_json  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.engines import DartsConfig  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402

SPACE = "levels.upper.variables.arch.space"
CONFIGS = {
    "DARTS 2nd order": (DartsConfig(order=2), []),
    "DARTS 2nd order, PC (K=4)": (DartsConfig(order=2), [f"{SPACE}.partial_channels=4", f"{SPACE}.edge_normalization=true"]),
    "DARTS 1st order": (DartsConfig(order=1), []),
    "DARTS 1st order, PC (K=4)": (DartsConfig(order=1), [f"{SPACE}.partial_channels=4", f"{SPACE}.edge_normalization=true"]),
}
SMALL = [f"{SPACE}.cells=2", f"{SPACE}.channels=8", "levels.upper.data.kwargs.n=64", "levels.lower.data.kwargs.n=64",
         "levels.upper.data.batch_size=8", "levels.lower.data.batch_size=8"]


def measure(name: str, config: Any, overrides: list[str], steps: int, warmup: int, device: str) -> dict[str, Any]:
    loaded = load_spec(find_preset("nas/cifar10"), overrides=[*overrides, f"run.steps={warmup + steps}",
                                                              "run.checkpoint_every=null", "run.monitor_every=100000"])
    cuda = device == "cuda"
    stamps: dict[int, float] = {}
    peak: dict[str, float] = {}

    def on_step(step: int, x: Any, y: Any) -> None:
        if step in (warmup, warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            stamps[step] = time.perf_counter()
            if cuda and step == warmup:
                torch.cuda.reset_peak_memory_stats()
            if cuda and step == warmup + steps:  # the timed steps' peak, not the final evaluation's
                peak["mib"] = torch.cuda.max_memory_allocated() / 2**20

    with tempfile.TemporaryDirectory() as out:
        result = bilevel.run(loaded, engine=config, device=device, out=out, overwrite=True, progress=False, on_step=on_step)
    per_step = (stamps[warmup + steps] - stamps[warmup]) / steps
    batch = loaded.spec.levels["lower"].data.batch_size
    per_epoch_steps = math.ceil(25000 / batch)
    return {
        "config": name,
        "engine": result.result["engine_config"],
        "overrides": overrides,
        "time_per_step_s": per_step,
        "steps_per_epoch": per_epoch_steps,
        "time_per_epoch_s": per_step * per_epoch_steps,
        "peak_memory_mib": peak.get("mib"),
        "device": result.result["device"],
        "gpu": torch.cuda.get_device_name() if cuda else None,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="timed outer steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed outer steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a tiny network and data set (smoke test of the script)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nas_gpu.json")
    args = parser.parse_args(argv)
    rows = []
    for name, (config, overrides) in CONFIGS.items():
        rows.append(measure(name, config, [*overrides, *(SMALL if args.small else [])], args.steps, args.warmup, args.device))
        row = rows[-1]
        memory = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f} MiB"
        print(f"{name}: {row['time_per_step_s'] * 1000:.1f} ms/step, {row['time_per_epoch_s']:.1f} s/epoch, peak {memory}", flush=True)
    payload = {"command": "python benchmarks/nas_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "torch": torch.__version__, "rows": rows}
    write_json(args.out, payload)
    device = rows[0]["gpu"] or rows[0]["device"]
    print()
    print(markdown_table([f"configuration ({device}, torch {torch.__version__})", "time per step (ms)", "time per epoch (s)", "peak memory (MiB)"],
                         ([row["config"], f"{row['time_per_step_s'] * 1000:.1f}", f"{row['time_per_epoch_s']:.1f}",
                           "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"] for row in rows)))
    print(f"\nfull figures in {args.out}")
    return rows


if __name__ == "__main__":
    main()
