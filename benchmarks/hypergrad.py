"""Time and peak memory of ONE data hyper-cleaning hypergradient, side by side in one process:
our engines vs TorchOpt's implicit differentiation, higher's unrolling, and the same algorithms
written in plain PyTorch (torch.autograd.grad, double backward) with no framework.

Setup (see benchmarks/README.md): lower = mean_i sigmoid(lam_i) CE(f_w(x_i), y~_i) + mu/2 ||w||^2,
upper = CE on validation; mu 1e-3, T = 100 inner GD steps at lr 0.05 from the same start, K = 20
CG steps; lam = 0; half of the training labels corrupted; Gaussian-mixture data.

    python benchmarks/hypergrad.py                      # sizes S and M on the default device
    python benchmarks/hypergrad.py --sizes S --n-train 500 --repeats 2   # quick smoke run
    python benchmarks/hypergrad.py --memory             # CPU: peak RSS per method (subprocesses)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as nnf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_name, measure, write_json  # noqa: E402
from bilevel.compile import compile_spec  # noqa: E402
from bilevel.engines import build_engine  # noqa: E402
from bilevel.engines import BORepConfig, ImplicitConfig, LinearSolverSpec, LVHBAConfig, PenaltyConfig, UnrolledConfig  # noqa: E402
from bilevel.spec import spec_from_data  # noqa: E402
from problems.hyperclean import mixture_split  # noqa: E402

# TorchOpt 0.7.3 calls the deprecated functorch.vjp once per hypergradient
warnings.filterwarnings("ignore", message="We've integrated functorch into PyTorch", category=FutureWarning)

SIZES = {
    "S": {"model": "linear", "n": 5000, "d": 784, "hidden": None},
    "M": {"model": "mlp", "n": 5000, "d": 784, "hidden": 256},
    "L": {"model": "mlp", "n": 50000, "d": 784, "hidden": 1024},
}
MU, LR, CLASSES = 1e-3, 0.05, 10
IFT_METHODS = ["ours implicit (CG)", "TorchOpt custom_root (CG)", "plain IFT (CG)"]
UNROLLED_METHODS = ["ours unrolled", "ours unrolled, checkpoint 10", "higher unrolled", "plain unrolled"]
# single-loop engines: one outer step in steady state (no peer implements them)
STEP_METHODS = ["ours penalty, one step", "ours bo_rep, one step", "ours lv_hba, one step"]


class Bench:
    """One size: data, initial weights and every method as a zero-argument callable."""

    def __init__(self, size: str, n: int, device: torch.device, dtype: torch.dtype, steps: int, cg_steps: int,
                 seed: int = 0, hidden: int | None = None):
        cfg = dict(SIZES[size], **({"hidden": hidden} if hidden else {}))
        self.steps, self.cg_steps, self.device, self.dtype = steps, cg_steps, device, dtype
        kwargs = {"dataset": "mixture", "n_train": n, "n_val": n, "d": cfg["d"], "classes": CLASSES, "seed": seed}
        split = mixture_split(**{k: v for k, v in kwargs.items() if k != "dataset"})
        to = {"device": device}
        self.xt = split["train"]["x"].to(device, dtype)
        self.yt = split["train"]["y"].to(**to)
        self.xv = split["val"]["x"].to(device, dtype)
        self.yv = split["val"]["y"].to(**to)
        self.lam = torch.zeros(n, device=device, dtype=dtype)
        if cfg["model"] == "linear":
            variables = {"W": {"shape": [CLASSES, cfg["d"]]}, "b": {"shape": [CLASSES]}}
        else:
            variables = {"net": {"kind": "module", "factory": "problems.hyperclean:mlp",
                                 "kwargs": {"d_in": cfg["d"], "hidden": cfg["hidden"], "classes": CLASSES}}}
        self.spec_data = {
            "name": f"bench-{size}",
            "levels": {
                "upper": {"variables": {"lam": {"shape": [n]}}, "objective": "problems.hyperclean:upper_objective",
                          "data": {"source": "problems.hyperclean:val_data", "kwargs": kwargs}},
                "lower": {"parent": "upper", "variables": variables, "objective": "problems.hyperclean:lower_objective",
                          "objective_kwargs": {"mu": MU}, "data": {"source": "problems.hyperclean:train_data", "kwargs": kwargs},
                          "solver": {"name": "sgd", "lr": LR, "steps": steps, "warm_start": False},
                          "assumptions": {"convexity": "strongly_convex"}},
            },
            "run": {"device": device.type, "dtype": "float64" if dtype == torch.float64 else "float32", "seed": 0},
        }
        self.problem = compile_spec(spec_from_data(self.spec_data), device)
        self.w0 = tuple(p.detach().clone() for p in self.problem.lower.init)
        self.model = cfg["model"]
        self.methods: dict[str, Callable[[], torch.Tensor]] = {
            "ours implicit (CG)": self._ours(ImplicitConfig(linear_solver=self.cg_spec(), fast_path="off")),
            "ours unrolled": self._ours(UnrolledConfig(fast_path="off")),
            "ours unrolled, checkpoint 10": self._ours(UnrolledConfig(checkpoint_every=10, fast_path="off")),
            "TorchOpt custom_root (CG)": self._torchopt,
            "higher unrolled": self._higher,
            "plain IFT (CG)": self._plain_ift,
            "plain unrolled": self._plain_unrolled,
            "ours penalty, one step": self._ours_steps(PenaltyConfig()),
            "ours bo_rep, one step": self._ours_steps(BORepConfig()),
            "ours lv_hba, one step": self._ours_steps(LVHBAConfig()),
        }

    def cg_spec(self) -> LinearSolverSpec:
        """CG as the peers run it: exactly K steps from zero."""
        return LinearSolverSpec(maxiter=self.cg_steps, tol=0.0, warm_start=False)

    # --- shared math for the peers and the plain versions -------------------------------------
    def logits(self, w, x):
        if self.model == "linear":
            return nnf.linear(x, w[0], w[1])
        # nn.Sequential(Linear, Tanh, Linear) parameters in order: W1, b1, W2, b2 (torch layout)
        return nnf.linear(torch.tanh(nnf.linear(x, w[0], w[1])), w[2], w[3])

    def lower_loss(self, lam, w):
        losses = nnf.cross_entropy(self.logits(w, self.xt), self.yt, reduction="none")
        return (torch.sigmoid(lam) * losses).mean() + 0.5 * MU * sum((p**2).sum() for p in w)

    def upper_loss(self, w):
        return nnf.cross_entropy(self.logits(w, self.xv), self.yv)

    def inner_solve(self, lam):
        w = tuple(p.clone().requires_grad_(True) for p in self.w0)
        for _ in range(self.steps):
            grads = torch.autograd.grad(self.lower_loss(lam, w), w)
            w = tuple((p - LR * g).detach().requires_grad_(True) for p, g in zip(w, grads))
        return w

    # --- methods ----------------------------------------------------------------------------
    def _ours(self, config):
        engine = build_engine(config)
        problem = self.problem

        def call():
            x = (self.lam.clone(),)
            return engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()).grad[0]

        return call

    def _ours_steps(self, config):
        """Successive calls advance the algorithm, so the median is a steady-state step
        (BO-REP's periodic lower updates included at their frequency)."""
        engine = build_engine(config)
        problem = self.problem
        x = (self.lam.clone(),)
        holder = {}

        def call():
            state = holder.get("state") or engine.init(problem, x)
            result = engine.hypergrad(problem, x, state, problem.upper.batch())
            holder["state"] = result.state
            return result.grad[0]

        return call

    def _plain_ift(self):
        lam = self.lam.clone().requires_grad_(True)
        w = self.inner_solve(lam.detach())
        gy = torch.autograd.grad(self.lower_loss(lam, w), w, create_graph=True)
        upper = self.upper_loss(w)
        b = torch.autograd.grad(upper, w)
        v = tuple(torch.zeros_like(p) for p in w)
        r = b
        p = r
        rs = sum((u * u).sum() for u in r)
        for _ in range(self.cg_steps):
            hp = torch.autograd.grad(gy, w, p, retain_graph=True)
            alpha = rs / sum((u * h).sum() for u, h in zip(p, hp))
            v = tuple(a + alpha * c for a, c in zip(v, p))
            r = tuple(a - alpha * h for a, h in zip(r, hp))
            rs_new = sum((u * u).sum() for u in r)
            p = tuple(a + (rs_new / rs) * c for a, c in zip(r, p))
            rs = rs_new
        (mixed,) = torch.autograd.grad(gy, lam, v)
        return -mixed  # grad_lam F = 0 for hyper-cleaning

    def _plain_unrolled(self):
        lam = self.lam.clone().requires_grad_(True)
        w = tuple(p.clone().requires_grad_(True) for p in self.w0)
        for _ in range(self.steps):
            grads = torch.autograd.grad(self.lower_loss(lam, w), w, create_graph=True)
            w = tuple(p - LR * g for p, g in zip(w, grads))
        (grad,) = torch.autograd.grad(self.upper_loss(w), lam)
        return grad

    def _torchopt(self):
        import torchopt

        def optimality(w, lam):
            return torch.func.grad(lambda ww: self.lower_loss(lam, ww))(w)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=self.cg_steps))
        def solve(w, lam):
            with torch.enable_grad():
                return self.inner_solve(lam.detach())

        lam = self.lam.clone().requires_grad_(True)
        w = solve(tuple(self.w0), lam)
        (grad,) = torch.autograd.grad(self.upper_loss(tuple(w)), lam)
        return grad

    def _higher(self):
        import higher

        if self.model == "linear":
            module = torch.nn.Linear(self.xt.shape[1], CLASSES).to(self.device, self.dtype)
            with torch.no_grad():
                module.weight.copy_(self.w0[0])
                module.bias.copy_(self.w0[1])

            def logits(fm, x):
                return fm(x)
        else:
            module = torch.nn.Sequential(torch.nn.Linear(self.xt.shape[1], self.w0[0].shape[0]), torch.nn.Tanh(),
                                         torch.nn.Linear(self.w0[0].shape[0], CLASSES)).to(self.device, self.dtype)
            with torch.no_grad():
                for p, q in zip(module.parameters(), self.w0):
                    p.copy_(q)

            def logits(fm, x):
                return fm(x)

        lam = self.lam.clone().requires_grad_(True)
        with higher.innerloop_ctx(module, torch.optim.SGD(module.parameters(), lr=LR), copy_initial_weights=True) as (fm, opt):
            for _ in range(self.steps):
                losses = nnf.cross_entropy(logits(fm, self.xt), self.yt, reduction="none")
                reg = 0.5 * MU * sum((p**2).sum() for p in fm.parameters())
                opt.step((torch.sigmoid(lam) * losses).mean() + reg)
            (grad,) = torch.autograd.grad(nnf.cross_entropy(logits(fm, self.xv), self.yv), lam)
        return grad


def measure_all(bench: Bench, names: list[str], repeats: int) -> dict[str, dict]:
    """Warm up every method (one call, whose value is checked for correctness), then time them
    round-robin (one call of each per round), so that drift and background load fall on all
    methods alike; peak CUDA memory per method."""
    return measure({name: bench.methods[name] for name in names}, bench.device, 1, repeats)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_growth_mib(call: Callable[[], torch.Tensor]) -> float:
    """How far the resident set rises above its level before ``call`` (MiB), peak over the call.

    getrusage's ru_maxrss alone is not enough in a child process: exec() carries the parent's
    high-water mark into the child's ru_maxrss, and setup (data, compilation) may already have
    peaked above what the call reaches. So the high-water mark is reset first (Linux:
    /proc/self/clear_refs, "5"), after which ru_maxrss and VmHWM both start from the current RSS."""
    import gc

    import higher  # noqa: F401  (imported here so that module loading is not counted as the call's memory)
    import torchopt  # noqa: F401

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _status_kib("VmRSS") if reset else None
    if before is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    after = _status_kib("VmHWM") if reset else None
    if after is None:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(after - before, 0) / 1024


def rss_peak(size: str, method: str, args) -> float:
    """Peak RSS growth (MiB) of one call, in a fresh process (CPU memory figure)."""
    cmd = [sys.executable, __file__, "--rss-child", method, "--sizes", size, "--n-train", str(args.n_train or SIZES[size]["n"]),
           "--inner-steps", str(args.inner_steps), "--cg-steps", str(args.cg_steps), "--dtype", args.dtype, "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="S,M")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--n-train", type=int, default=None, help="override the number of examples (smoke runs)")
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--cg-steps", type=int, default=20)
    parser.add_argument("--methods", default=None, help="comma-separated subset of the method names")
    parser.add_argument("--memory", action="store_true", help="on CPU, measure peak RSS per method in subprocesses")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference of each algorithm")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    if args.rss_child:
        size = args.sizes
        bench = Bench(size, args.n_train or SIZES[size]["n"], device, dtype, args.inner_steps, args.cg_steps)
        print(_peak_growth_mib(bench.methods[args.rss_child]))
        return []

    load_before = os.getloadavg()
    if device.type == "cpu" and load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before the run; other processes on this CPU distort the"
              " timings (OpenMP threads that share cores can slow down several-fold)", file=sys.stderr)
    rows = []
    for size in args.sizes.split(","):
        n = args.n_train or SIZES[size]["n"]
        bench = Bench(size, n, device, dtype, args.inner_steps, args.cg_steps)
        names = args.methods.split(",") if args.methods else list(bench.methods)
        results = measure_all(bench, names, args.repeats)
        exact = {}
        if not args.no_reference:
            ref_bench = Bench(size, n, device, torch.float64, args.inner_steps, args.cg_steps)
            exact = {"plain IFT (CG)": ref_bench.methods["plain IFT (CG)"]().float(), "plain unrolled": ref_bench.methods["plain unrolled"]().float()}
            del ref_bench
        for name, res in results.items():
            reference = "plain IFT (CG)" if name in IFT_METHODS else "plain unrolled" if name in UNROLLED_METHODS else None
            ref = results.get(reference) if reference else None
            rel = None if ref is None else float((res["value"] - ref["value"]).norm() / ref["value"].norm())
            peak = res["peak_mib"]
            if peak is None and args.memory and device.type == "cpu":
                peak = rss_peak(size, name, args)
            truth = exact.get(reference) if reference else None
            rel64 = None if truth is None else float((res["value"].float() - truth).norm() / truth.norm())
            rows.append({"size": size, "n": n, "method": name, "median_ms": res["median_ms"], "times_ms": res["times_ms"],
                         "peak_mib": peak, "rel_err_vs_plain": rel, "rel_err_vs_float64": rel64, "reference": reference})
        for row in rows:
            if row["size"] == size and row["reference"] is not None:
                row["check"] = _check(row, next(r for r in rows if r["size"] == size and r["method"] == row["reference"]), args.dtype)
        peer = {r["method"]: r["median_ms"] for r in rows if r["size"] == size}
        for row in rows:
            if row["size"] != size:
                continue
            base = peer.get("TorchOpt custom_root (CG)") if row["method"] in IFT_METHODS else peer.get("higher unrolled") if row["method"] in UNROLLED_METHODS else None
            row["speedup_vs_peer"] = None if base is None else base / row["median_ms"]

    load_after = os.getloadavg()
    meta = {"device": device_name(device), "torch": torch.__version__,
            "dtype": args.dtype, "inner_steps": args.inner_steps, "cg_steps": args.cg_steps, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": load_after,
            "cuda": torch.version.cuda, "argv": sys.argv[1:] if argv is None else argv}
    print(f"# one hyper-cleaning hypergradient: {meta['device']}, torch {meta['torch']}, {args.dtype}, "
          f"T={args.inner_steps}, K={args.cg_steps}, median of {args.repeats} round-robin calls after warm-up;"
          " speed vs peer = TorchOpt's time (IFT rows) or higher's (unrolled rows) / this row's")
    print(f"{'size':4} {'method':30} {'median ms':>10} {'peak MiB':>9} {'err vs plain':>13} {'err vs fp64':>12} {'check':>6} {'speed vs peer':>14}")
    for row in rows:
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        rel = "-" if row["rel_err_vs_plain"] is None else f"{row['rel_err_vs_plain']:.1e}"
        rel64 = "-" if row["rel_err_vs_float64"] is None else f"{row['rel_err_vs_float64']:.1e}"
        speed = "-" if row.get("speedup_vs_peer") is None else f"{row['speedup_vs_peer']:.2f}x"
        check = row.get("check") or "-"
        print(f"{row['size']:4} {row['method']:30} {row['median_ms']:10.1f} {peak:>9} {rel:>13} {rel64:>12} {check:>6} {speed:>14}")
    if load_after[0] > 0.5 + 1.0 * (device.type == "cpu") and device.type == "cpu":
        print(f"# load average rose to {load_after[0]:.2f} during the run (this process counts for about 1):"
              " other work shared the CPU, compare ratios only", file=sys.stderr)
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows})
    return rows


def _check(row: dict, plain: dict, dtype: str) -> str:
    """'ok' when a method computes what the plain implementation of its algorithm computes.

    float64: within 1e-8 of plain. float32: the two differ by rounding only, which CG on this
    ill-conditioned system (mu = 1e-3) can amplify, so the test is against the float64 result
    of the algorithm: no further from it than 10x the plain float32 version (or 1e-4)."""
    if dtype == "float64" or row["rel_err_vs_float64"] is None:
        tol = 1e-8 if dtype == "float64" else 1e-3
        return "ok" if row["rel_err_vs_plain"] is not None and row["rel_err_vs_plain"] <= tol else "FAIL"
    bound = max(10 * (plain["rel_err_vs_float64"] or 0.0), 1e-4)
    return "ok" if row["rel_err_vs_float64"] <= bound else "FAIL"


if __name__ == "__main__":
    main()
