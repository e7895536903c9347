"""The benchmark suite (see benchmarks/README.md): one script for every configuration, one table
printed last, every figure in JSON.

Per size (S, M, L of the data hyper-cleaning benchmark; B = N independent instances of S):
time (median of timed calls after warm-up, round-robin, CUDA synchronized) and peak memory of
ONE hypergradient for our engines eager, through the fast path (CUDA graph; compiled inner loop)
and in reduced precision (TF32, bf16), against TorchOpt, higher and the same algorithm in plain
PyTorch in the same process; relative error and cosine against the plain float32 version of the
same algorithm; a check column. B compares one batched call for all instances with the
instances' TorchOpt hypergradients one after the other. ``--e2e`` adds time-to-target-loss on the
digits hyper-cleaning preset (150 outer steps) for ours and for TorchOpt / higher loops.

    python benchmarks/suite.py --device cuda --json h100.json            # the GPU run, full sizes
    python benchmarks/suite.py --sizes S,B --n B=500 --e2e --json cpu.json  # CPU-sized
    python benchmarks/suite.py --sizes L --n L=2000 --hidden L=512 --memory  # CPU, peak RSS per method
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hypergrad import CLASSES, LR, MU, SIZES, Bench, _check, _peak_growth_mib  # noqa: E402

from benchmarks._common import device_name, measure, write_json  # noqa: E402

from bilevel import run  # noqa: E402
from bilevel.compile import compile_spec  # noqa: E402
from bilevel.engines import build_engine  # noqa: E402
from bilevel.fastpath.precision import agreement  # noqa: E402
from bilevel.engines import ImplicitConfig, UnrolledConfig  # noqa: E402
from bilevel.spec import PrecisionSpec, load_spec, spec_from_data  # noqa: E402

warnings.filterwarnings("ignore", message="We've integrated functorch into PyTorch", category=FutureWarning)

IFT, UNROLLED = "IFT", "unrolled"


# --- methods ------------------------------------------------------------------------------------
def our_methods(bench: Bench, device: torch.device, checkpoint_every: list[int]) -> dict[str, tuple[str, Any]]:
    """name -> (family, engine config) for our rows."""
    cg = bench.cg_spec()
    rows: dict[str, tuple[str, Any]] = {
        "ours IFT, eager": (IFT, ImplicitConfig(linear_solver=cg, fast_path="off")),
        "ours IFT, fast path": (IFT, ImplicitConfig(linear_solver=cg, fast_path="auto")),
        "ours IFT, compile": (IFT, ImplicitConfig(linear_solver=cg, fast_path="compile")),
        "ours IFT, bf16": (IFT, ImplicitConfig(linear_solver=cg, precision=PrecisionSpec(mode="bf16", check_every=None))),
        "ours unrolled, eager": (UNROLLED, UnrolledConfig(fast_path="off")),
        "ours unrolled, fast path": (UNROLLED, UnrolledConfig(fast_path="auto")),
        "ours unrolled, bf16": (UNROLLED, UnrolledConfig(precision=PrecisionSpec(mode="bf16", check_every=None))),
    }
    for every in checkpoint_every:
        rows[f"ours unrolled, checkpoint {every}"] = (UNROLLED, UnrolledConfig(checkpoint_every=every, fast_path="off"))
        rows[f"ours unrolled, checkpoint {every}, fast path"] = (UNROLLED, UnrolledConfig(checkpoint_every=every))
    if device.type == "cuda":  # TF32 is a CUDA format: on CPU these rows would be fp32 again
        rows["ours IFT, tf32"] = (IFT, ImplicitConfig(linear_solver=cg, precision=PrecisionSpec(mode="tf32", check_every=None)))
        rows["ours unrolled, tf32"] = (UNROLLED, UnrolledConfig(precision=PrecisionSpec(mode="tf32", check_every=None)))
    return rows


PEERS = {
    "TorchOpt IFT (CG)": (IFT, "TorchOpt custom_root (CG)"),
    "plain IFT (CG)": (IFT, "plain IFT (CG)"),
    "higher unrolled": (UNROLLED, "higher unrolled"),
    "plain unrolled": (UNROLLED, "plain unrolled"),
}
REFERENCE = {IFT: "plain IFT (CG)", UNROLLED: "plain unrolled"}
PEER = {IFT: "TorchOpt IFT (CG)", UNROLLED: "higher unrolled"}


def ours_call(problem: Any, engine: Any) -> Callable[[], torch.Tensor]:
    """One hypergradient from a fresh state (every call has the same signature, so the fast path
    captures at the second call and replays from the third)."""

    def call() -> torch.Tensor:
        x = problem.fresh(problem.upper.init)
        return engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()).grad[0]

    return call


def methods_for(bench: Bench, device: torch.device, checkpoint_every: list[int]) -> dict[str, tuple[str, Callable[[], torch.Tensor], Any]]:
    """name -> (family, call, engine or None for peers)."""
    out: dict[str, tuple[str, Callable[[], torch.Tensor], Any]] = {}
    for name, (family, config) in our_methods(bench, device, checkpoint_every).items():
        engine = build_engine(config)
        out[name] = (family, ours_call(bench.problem, engine), engine)
    for name, (family, key) in PEERS.items():
        out[name] = (family, bench.methods[key], None)
    return out


def ran_as(engine: Any) -> str | None:
    """What the fast path did, in a few words (None for peers)."""
    if engine is None:
        return None
    report = engine.execution_report()
    if report["hypergradient"] == "cuda_graph":
        return "graph" + (" (compiled inner loop)" if "compiled" in report["inner_loop"] else "")
    return {"cuda_graph": "inner loop in a graph", "compiled": "compiled inner loop"}.get(report["inner_loop"], "eager")


# --- measuring (benchmarks/_common.py times the calls) ---------------------------------------
def rss_of(size: str, method: str, args: argparse.Namespace) -> float:
    """Peak resident-set growth (MiB) of one call in a fresh process (the CPU memory figure)."""
    cmd = [sys.executable, __file__, "--rss-child", method, "--sizes", size, "--device", "cpu",
           "--n", args.n or "", "--hidden", args.hidden or "", "--inner-steps", str(args.inner_steps),
           "--cg-steps", str(args.cg_steps), "--checkpoint-every", str(args.checkpoint_every)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _order(args: argparse.Namespace, device: torch.device) -> str:
    return args.order or ("sequential" if device.type == "cuda" else "round-robin")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _overrides(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        key, value = part.split("=")
        out[key.strip()] = int(value)
    return out


# --- sizes S, M, L --------------------------------------------------------------------------
def run_size(size: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    n = _overrides(args.n).get(size, SIZES[size]["n"])
    hidden = _overrides(args.hidden).get(size)
    bench = Bench(size, n, device, torch.float32, args.inner_steps, args.cg_steps, hidden=hidden)
    methods = methods_for(bench, device, _ints(args.checkpoint_every))
    wanted = [m for m in methods if not args.methods or any(w in m for w in args.methods.split(","))]
    for family in (IFT, UNROLLED):  # the reference and the peer are always measured
        if any(methods[m][0] == family for m in wanted):
            wanted += [m for m in (PEER[family], REFERENCE[family]) if m not in wanted]
    results = measure({m: methods[m][1] for m in wanted}, device, args.warmup, args.repeats,
                      {m: methods[m][2] for m in wanted}, _order(args, device))
    exact = {}
    if not args.no_reference:
        ref = Bench(size, n, device, torch.float64, args.inner_steps, args.cg_steps, hidden=hidden)
        for family in (IFT, UNROLLED):
            if REFERENCE[family] in wanted:
                try:
                    exact[family] = ref.methods[REFERENCE[family]]().float()
                except torch.cuda.OutOfMemoryError:  # unrolled L in float64 needs ~83 GB
                    print(f"# {size}: no float64 reference for {family} (out of GPU memory)", file=sys.stderr)
                    torch.cuda.empty_cache()
        del ref
    rows = []
    for name in wanted:
        family = methods[name][0]
        grad = results[name]["value"].detach().float()
        reference = results[REFERENCE[family]]["value"].detach().float()
        cosine, rel = agreement((grad,), (reference,))
        truth = exact.get(family)
        row = {
            "size": size, "n": n, "hidden": hidden or SIZES[size]["hidden"], "family": family, "method": name,
            "median_ms": results[name]["median_ms"], "times_ms": results[name]["times_ms"], "warmup_s": results[name]["warmup_s"],
            "peak_mib": results[name]["peak_mib"], "rel_err_vs_plain": float(rel), "cosine_vs_plain": float(cosine),
            "rel_err_vs_float64": None if truth is None else float((grad - truth).norm() / truth.norm()),
            "reference": REFERENCE[family],
            "ran_as": ran_as(methods[name][2]),
            "fast_path": None if methods[name][2] is None else methods[name][2].execution_report(),
        }
        if args.memory and device.type == "cpu":
            row["peak_mib"] = rss_of(size, name, args)
        rows.append(row)
    by_name = {r["method"]: r for r in rows}
    for row in rows:
        family = row["family"]
        peer, plain = by_name.get(PEER[family]), by_name[REFERENCE[family]]
        row["speedup_vs_peer"] = None if peer is None else peer["median_ms"] / row["median_ms"]
        row["time_vs_plain"] = row["median_ms"] / plain["median_ms"]
        if "bf16" in row["method"] or "tf32" in row["method"]:
            row["check"] = "ok" if row["cosine_vs_plain"] >= 0.999 else "FAIL"
        else:
            plain_row = {"rel_err_vs_float64": plain["rel_err_vs_float64"]}
            row["check"] = _check(row, plain_row, "float32")
    return rows


# --- size B: N instances of S ----------------------------------------------------------------
def run_batch(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    count = args.instances
    n = _overrides(args.n).get("B", SIZES["S"]["n"])
    benches = [Bench("S", n, device, torch.float32, args.inner_steps, args.cg_steps, seed=k) for k in range(count)]
    data = json.loads(json.dumps(benches[0].spec_data))
    data["instances"] = {"count": count, "vary": {f"levels.{lvl}.data.kwargs.seed": list(range(count)) for lvl in ("upper", "lower")}}
    data["run"]["seed"] = 0
    batched = compile_spec(spec_from_data(data), device)
    cg = benches[0].cg_spec()

    def ours(config: Any) -> Callable[[], torch.Tensor]:
        engine = build_engine(config)
        call = ours_call(batched, engine)
        call.engine = engine  # type: ignore[attr-defined]
        return call

    def sequential(key: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            return torch.stack([b.methods[key]() for b in benches])

        return call

    calls = {
        f"ours IFT, batched x{count}, eager": ours(ImplicitConfig(linear_solver=cg, fast_path="off")),
        f"ours IFT, batched x{count}, fast path": ours(ImplicitConfig(linear_solver=cg, fast_path="auto")),
        f"ours IFT, batched x{count}, bf16": ours(ImplicitConfig(linear_solver=cg, precision=PrecisionSpec(mode="bf16", check_every=None))),
        f"TorchOpt IFT (CG), {count} sequential": sequential("TorchOpt custom_root (CG)"),
        f"plain IFT (CG), {count} sequential": sequential("plain IFT (CG)"),
    }
    if device.type == "cuda":
        calls[f"ours IFT, batched x{count}, tf32"] = ours(ImplicitConfig(linear_solver=cg, precision=PrecisionSpec(mode="tf32", check_every=None)))
    if args.methods:
        calls = {k: v for k, v in calls.items() if any(w in k for w in args.methods.split(",")) or "plain" in k}
    results = measure(calls, device, args.warmup, max(1, args.repeats // 2),
                      {k: getattr(c, "engine", None) for k, c in calls.items()}, _order(args, device))
    plain = results[f"plain IFT (CG), {count} sequential"]
    peer = results.get(f"TorchOpt IFT (CG), {count} sequential")
    exact = None
    if not args.no_reference:  # each instance's plain IFT in float64: what rounding costs each method
        exact = torch.stack([Bench("S", n, device, torch.float64, args.inner_steps, args.cg_steps, seed=k)
                             .methods["plain IFT (CG)"]().float() for k in range(count)])

    def worst_vs_exact(grad: torch.Tensor) -> float | None:
        if exact is None:
            return None
        return max(float((grad[k] - exact[k]).norm() / exact[k].norm()) for k in range(count))

    plain_worst = worst_vs_exact(plain["value"].float())
    rows = []
    for name, res in results.items():
        grad = res["value"].detach().float()
        cosine, rel = agreement((grad,), (plain["value"].float(),))
        per_instance = [float((grad[k] - plain["value"][k]).norm() / plain["value"][k].norm()) for k in range(count)]
        row = {
            "size": "B", "n": n, "instances": count, "family": IFT, "method": name, "median_ms": res["median_ms"],
            "times_ms": res["times_ms"], "warmup_s": res["warmup_s"], "peak_mib": res["peak_mib"],
            "rel_err_vs_plain": float(rel), "worst_instance_rel_err": max(per_instance), "cosine_vs_plain": float(cosine),
            "instances_per_s": 1000 * count / res["median_ms"], "reference": f"plain IFT (CG), {count} sequential",
            "speedup_vs_peer": None if peer is None else peer["median_ms"] / res["median_ms"],
            "time_vs_plain": res["median_ms"] / plain["median_ms"],
            "ran_as": ran_as(getattr(calls[name], "engine", None)),
        }
        row["worst_instance_rel_err_vs_float64"] = worst_vs_exact(grad)
        reduced = "bf16" in name or "tf32" in name
        if reduced:
            row["check"] = "ok" if cosine >= 0.999 else "FAIL"
        elif plain_worst is None:
            row["check"] = "ok" if row["worst_instance_rel_err"] < 1e-3 else "FAIL"
        else:  # as for S, M, L: no further from float64 than 10x plain float32 (or 1e-4)
            row["check"] = "ok" if row["worst_instance_rel_err_vs_float64"] <= max(10 * plain_worst, 1e-4) else "FAIL"
        rows.append(row)
    return rows


# --- end to end: digits hyper-cleaning -----------------------------------------------------------
class DigitsLoop:
    """The digits preset's algorithm written with a peer: inner SGD (lr, T steps, warm-started),
    hypergradient by TorchOpt's implicit differentiation or higher's unrolling, outer Adam."""

    def __init__(self, preset: Any, device: torch.device):
        from problems.hyperclean import digits_split

        spec = preset.spec
        lower, upper = spec.levels["lower"], spec.levels["upper"]
        split = digits_split()
        self.device = device
        self.xt, self.yt = split["train"]["x"].to(device), split["train"]["y"].to(device)
        self.xv, self.yv = split["val"]["x"].to(device), split["val"]["y"].to(device)
        self.test = (split["test"]["x"].to(device), split["test"]["y"].to(device))
        self.mu = lower.objective_kwargs["mu"]
        self.lr, self.steps = lower.solver.lr, lower.solver.steps
        self.outer_lr, self.outer_steps = upper.solver.lr, spec.run.steps
        d = self.xt.shape[1]
        self.w = (torch.zeros(10, d, device=device), torch.zeros(10, device=device))
        self.lam = torch.zeros(self.xt.shape[0], device=device, requires_grad=True)

    def lower_loss(self, lam: torch.Tensor, w: Any) -> torch.Tensor:
        losses = nnf.cross_entropy(nnf.linear(self.xt, w[0], w[1]), self.yt, reduction="none")
        return (torch.sigmoid(lam) * losses).mean() + 0.5 * self.mu * sum((p**2).sum() for p in w)

    def upper_loss(self, w: Any) -> torch.Tensor:
        return nnf.cross_entropy(nnf.linear(self.xv, w[0], w[1]), self.yv)

    def solve(self, lam: torch.Tensor, w: Any) -> tuple[torch.Tensor, ...]:
        w = tuple(p.detach().requires_grad_(True) for p in w)
        for _ in range(self.steps):
            grads = torch.autograd.grad(self.lower_loss(lam, w), w)
            w = tuple((p - self.lr * g).detach().requires_grad_(True) for p, g in zip(w, grads))
        return tuple(p.detach() for p in w)

    def torchopt_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torchopt

        def optimality(w: Any, lam: torch.Tensor) -> Any:
            return torch.func.grad(lambda ww: self.lower_loss(lam, ww))(w)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=20))
        def inner(w: Any, lam: torch.Tensor) -> Any:
            with torch.enable_grad():
                return self.solve(lam.detach(), w)

        w = inner(self.w, self.lam)
        loss = self.upper_loss(tuple(w))
        (grad,) = torch.autograd.grad(loss, self.lam)
        self.w = tuple(p.detach() for p in w)
        return grad, loss.detach()

    def higher_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        import higher

        module = torch.nn.Linear(self.xt.shape[1], 10).to(self.device)
        with torch.no_grad():
            module.weight.copy_(self.w[0])
            module.bias.copy_(self.w[1])
        with higher.innerloop_ctx(module, torch.optim.SGD(module.parameters(), lr=self.lr), copy_initial_weights=True) as (fm, opt):
            for _ in range(self.steps):
                losses = nnf.cross_entropy(fm(self.xt), self.yt, reduction="none")
                reg = 0.5 * self.mu * sum((p**2).sum() for p in fm.parameters())
                opt.step((torch.sigmoid(self.lam) * losses).mean() + reg)
            loss = nnf.cross_entropy(fm(self.xv), self.yv)
            (grad,) = torch.autograd.grad(loss, self.lam)
            self.w = tuple(p.detach() for p in fm.parameters())
        return grad, loss.detach()

    def run(self, step: Callable[[], Any]) -> tuple[list[float], list[float], float]:
        optimizer = torch.optim.Adam([self.lam], lr=self.outer_lr)
        losses, times = [], []
        started = time.perf_counter()
        for _ in range(self.outer_steps):
            grad, loss = step()
            self.lam.grad = grad
            optimizer.step()
            losses.append(float(loss))  # one sync per outer step, as the runtime does
            times.append(time.perf_counter() - started)
        with torch.no_grad():
            accuracy = float((nnf.linear(self.test[0], *self.w).argmax(1) == self.test[1]).double().mean())
        return losses, times, accuracy


def run_e2e(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    preset_path = ROOT / "problems" / "hyperclean" / "digits.yaml"
    rows = []

    def record(name: str, losses: list[float], times: list[float], accuracy: float | None, fast: Any = None) -> None:
        hit = next((i for i, loss in enumerate(losses) if loss <= args.e2e_target), None)
        rows.append({"method": name, "steps": len(losses), "target_val_loss": args.e2e_target,
                     "steps_to_target": None if hit is None else hit + 1, "time_to_target_s": None if hit is None else times[hit],
                     "total_s": times[-1], "final_val_loss": losses[-1], "test_accuracy": accuracy, "fast_path": fast})

    ours = {
        "ours IFT, eager": ImplicitConfig(fast_path="off"),
        "ours IFT, fast path": ImplicitConfig(fast_path="auto"),
        "ours IFT, compile": ImplicitConfig(fast_path="compile"),
        "ours unrolled, eager": UnrolledConfig(fast_path="off"),
        "ours unrolled, fast path": UnrolledConfig(fast_path="auto"),
    }
    for name, config in ours.items():
        if args.methods and not any(w in name for w in args.methods.split(",")):
            continue
        preset = load_spec(preset_path, [f"run.device={device.type}", "report_kwargs.baselines=false"])
        with tempfile.TemporaryDirectory() as out:
            result = run(preset, engine=config, out=out, overwrite=True, progress=False)
            trace = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        record(name, [r["upper_loss"] for r in trace], [r["elapsed_s"] for r in trace], result.result["report"]["test_accuracy"],
               result.result.get("fast_path"))
    for name, kind in (("TorchOpt IFT (CG)", "torchopt"), ("higher unrolled", "higher")):
        loop = DigitsLoop(load_spec(preset_path), device)
        losses, times, accuracy = loop.run(loop.torchopt_step if kind == "torchopt" else loop.higher_step)
        record(name, losses, times, accuracy)
    return rows


# --- output -----------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_tables(rows: list[dict[str, Any]], e2e: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"\n# one hyper-cleaning hypergradient: {meta['device']}, torch {meta['torch']}, float32 (TF32 off unless the row says),"
          f" T={meta['inner_steps']}, K={meta['cg_steps']}; median of {meta['repeats']} round-robin calls after {meta['warmup']} warm-up"
          " calls; vs peer = TorchOpt's (IFT) or higher's (unrolled) time over the row's; vs plain = the row's time over plain"
          " PyTorch's; errors and cosine against plain PyTorch float32 of the same algorithm")
    print(f"{'size':4} {'method':42} {'median ms':>10} {'peak MiB':>9} {'vs peer':>8} {'vs plain':>8} {'err vs plain':>12}"
          f" {'cosine':>9} {'err vs fp64':>11} {'check':>5}  ran as")
    for r in rows:
        print(f"{r['size']:4} {r['method']:42} {_fmt(r['median_ms'], '10.1f')} {_fmt(r['peak_mib'], '9.0f')}"
              f" {_times(r.get('speedup_vs_peer')):>8} {_times(r.get('time_vs_plain')):>8}"
              f" {_fmt(r['rel_err_vs_plain'], '12.1e')} {_fmt(r['cosine_vs_plain'], '9.6f')}"
              f" {_fmt(r.get('rel_err_vs_float64'), '11.1e')} {r.get('check', '-'):>5}  {r.get('ran_as') or '-'}")
    batch = [r for r in rows if r["size"] == "B"]
    if batch:
        print(f"\n# B: {batch[0]['instances']} independent instances of S (n={batch[0]['n']}); one call = all instances")
        print(f"{'method':42} {'ms per call':>11} {'instances/s':>12} {'vs TorchOpt':>11} {'worst err vs plain':>18}"
              f" {'worst err vs fp64':>17} {'check':>5}")
        for r in batch:
            print(f"{r['method']:42} {r['median_ms']:11.1f} {r['instances_per_s']:12.1f} {_times(r['speedup_vs_peer']):>11}"
                  f" {r['worst_instance_rel_err']:18.1e} {_fmt(r['worst_instance_rel_err_vs_float64'], '17.1e')} {r['check']:>5}")
    if e2e:
        print(f"\n# end to end: digits hyper-cleaning preset ({e2e[0]['steps']} outer steps), time until the validation loss"
              f" is <= {e2e[0]['target_val_loss']}")
        print(f"{'method':30} {'steps to target':>15} {'time to target s':>16} {'total s':>8} {'final val loss':>14} {'test acc':>8}")
        for r in e2e:
            print(f"{r['method']:30} {_fmt(r['steps_to_target'], '15d')} {_fmt(r['time_to_target_s'], '16.2f')} {r['total_s']:8.2f}"
                  f" {r['final_val_loss']:14.4f} {_fmt(r['test_accuracy'], '8.4f')}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="S,M,L,B", help="any of S, M, L, B")
    parser.add_argument("--n", default=None, help="examples per size, e.g. S=1000,L=5000,B=500 (default: the standard sizes)")
    parser.add_argument("--hidden", default=None, help="hidden width per size, e.g. L=512")
    parser.add_argument("--instances", type=int, default=64, help="instances in size B")
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--cg-steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", default="10,2", help="checkpoint intervals of the checkpointed unrolled rows")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (the fast path captures at the 2nd)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--order", choices=["round-robin", "sequential"], default=None,
                        help="timing order (default: sequential on CUDA, freeing each method's graphs; round-robin on CPU)")
    parser.add_argument("--methods", default=None, help="comma-separated substrings of the method names to run")
    parser.add_argument("--memory", action="store_true", help="on CPU, peak RSS growth per method (fresh processes)")
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    parser.add_argument("--e2e", action="store_true", help="also time-to-target on the digits preset")
    parser.add_argument("--e2e-target", type=float, default=0.30, help="validation loss to reach")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the tf32 rows turn it on for their call)
    torch.backends.cudnn.allow_tf32 = False

    if args.rss_child:
        size = args.sizes
        bench = Bench(size, _overrides(args.n).get(size, SIZES[size]["n"]), device, torch.float32, args.inner_steps,
                      args.cg_steps, hidden=_overrides(args.hidden).get(size))
        print(_peak_growth_mib(methods_for(bench, device, _ints(args.checkpoint_every))[args.rss_child][1]))
        return {}

    load = os.getloadavg()
    if device.type == "cpu" and load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f}: other processes share this CPU; compare ratios only", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for size in args.sizes.split(","):
        started = time.perf_counter()
        rows += run_batch(args, device) if size == "B" else run_size(size, args, device)
        print(f"# {size} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    e2e = run_e2e(args, device) if args.e2e else []
    meta = {
        "device": device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "inner_steps": args.inner_steps, "cg_steps": args.cg_steps, "inner_lr": LR, "mu": MU, "classes": CLASSES,
        "warmup": args.warmup, "repeats": args.repeats, "loadavg_before": load, "loadavg_after": os.getloadavg(),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    print_tables(rows, e2e, meta)
    out = {"meta": meta, "rows": rows, "e2e": e2e}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
