"""End-to-end time to a target validation loss, and final test accuracy, on the digits
hyper-cleaning preset (problems/hyperclean/digits.yaml) and the per-weight L2 preset
(problems/hpo/l2_per_weight.yaml), all methods in one process, interleaved:

* ours, auto: the preset with ``solver: {name: auto}`` (the planner's inner solver, docs/inner-solvers.md);
* ours, fixed steps: the preset as it is (its GD steps, warm-started), same engine (implicit, CG 20);
* TorchOpt ``torchopt.diff.implicit.custom_root`` as documented: the inner solve is the same warm-
  started GD written in plain PyTorch under ``torch.enable_grad()``, the optimality condition is
  ``torch.func.grad`` of the lower loss, ``solve_cg(maxiter=20)``;
* higher ``innerloop_ctx`` with ``torch.optim.SGD``: the same GD steps unrolled from the warm start.

Every method takes the preset's outer steps with torch.optim.Adam at the preset's outer learning
rate, from the same start and data. Each step's wall time is recorded along with the upper
variables; afterwards (untimed) the validation loss F(x_t, y*(x_t)) of each recorded x_t is
evaluated with the lower level solved to convergence in float64 (torch.optim.LBFGS), so every
method is judged by the same measure whatever its own inner accuracy. The target is the worst
of the methods' best validation losses in a first, untimed round (so every method reaches it),
plus 1% of the distance from the initial loss; time to target is the time of the first step at
or below it. Test accuracy, two readings: of the lower solution each method ends with (its own
inner accuracy included), and of y*(x_T) solved to convergence at its last upper iterate (the
quality of the upper solution alone). Timed rounds: 5,
interleaved (round r runs every method once), medians reported.

    OMP_NUM_THREADS=2 python benchmarks/time_to_target.py              # both presets, 5 rounds, scaling table
    python benchmarks/time_to_target.py --rounds 1 --steps 20 --no-scaling   # quick smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_json  # noqa: E402
from bilevel.compile import compile_spec  # noqa: E402
from bilevel.engines import build_engine  # noqa: E402
from bilevel.planner import make_plan  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.hpo.digits import test_data as l2_test  # noqa: E402
from problems.hyperclean import digits_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ours, auto", "ours, fixed steps", "TorchOpt custom_root", "higher unrolled"]
Tree = tuple[torch.Tensor, ...]


@dataclass
class Task:
    """One preset: the spec, and the same objectives in plain PyTorch for the peers."""

    name: str
    path: str
    lower: Callable[[torch.Tensor, Tree, dict], torch.Tensor]
    """lower(raw upper x, (W, b), train batch)."""
    test: dict[str, torch.Tensor]

    def upper(self, w: Tree, val: dict) -> torch.Tensor:
        return nnf.cross_entropy(nnf.linear(val["x"], w[0], w[1]), val["y"])

    def accuracy(self, w: Tree) -> float:
        x, y = self.test["x"].to(w[0]), self.test["y"]
        return float((nnf.linear(x, w[0], w[1]).argmax(1) == y).double().mean())


def _hyperclean_lower(lam: torch.Tensor, w: Tree, batch: dict) -> torch.Tensor:
    losses = nnf.cross_entropy(nnf.linear(batch["x"], w[0], w[1]), batch["y"], reduction="none")
    return (torch.sigmoid(lam) * losses).mean() + 0.5e-3 * ((w[0] ** 2).sum() + (w[1] ** 2).sum())


def _l2_lower(raw: torch.Tensor, w: Tree, batch: dict) -> torch.Tensor:
    lo, hi = math.log(1e-5), math.log(1.0)  # the preset's log-stretched sigmoid (bilevel/hyperparameters.py)
    l2 = torch.exp(lo + (hi - lo) * torch.sigmoid(raw)).clamp(1e-5, 1.0)
    return nnf.cross_entropy(nnf.linear(batch["x"], w[0], w[1]), batch["y"]) + 0.5 * (l2 * w[0] ** 2).sum()


TASKS = {
    "hyperclean": Task("digits hyper-cleaning", "problems/hyperclean/digits.yaml", _hyperclean_lower, digits_split()["test"]),
    "l2": Task("per-weight L2", "problems/hpo/l2_per_weight.yaml", _l2_lower, l2_test()),
}


class Setup:
    """The compiled preset (twice: as declared, and with solver auto), its start and data."""

    def __init__(self, task: Task, steps: int | None, overrides: tuple[str, ...] = ()):
        self.task = task
        common = ["run.device=cpu", *overrides]
        self.loaded = {"fixed": load_spec(ROOT / task.path, common),
                       "auto": load_spec(ROOT / task.path, [*common, "levels.lower.solver.name=auto"])}
        base = compile_spec(self.loaded["fixed"])
        self.solver = base.lower.solver
        self.outer = base.upper.solver
        self.steps = steps or self.loaded["fixed"].spec.run.steps
        self.x0 = base.fresh(base.upper.init)[0]
        self.w0 = base.fresh(base.lower.init)
        self.train, self.val = base.lower.batch(), base.upper.batch()

    def adam(self, x: torch.Tensor) -> torch.optim.Optimizer:
        return torch.optim.Adam([x], lr=self.outer.lr, betas=self.outer.betas)

    def gd(self, x: torch.Tensor, w: Tree) -> Tree:
        """The preset's inner GD, plain PyTorch, no graph (TorchOpt's inner solve)."""
        w = tuple(p.detach().requires_grad_(True) for p in w)
        for _ in range(self.solver.steps):
            grads = torch.autograd.grad(self.task.lower(x, w, self.train), w)
            w = tuple((p - self.solver.lr * g).detach().requires_grad_(True) for p, g in zip(w, grads))
        return w


def _ours(setup: Setup, which: str) -> Callable[[], tuple[list[float], list[torch.Tensor], Tree]]:
    def go() -> tuple[list[float], list[torch.Tensor], Tree]:
        problem = compile_spec(setup.loaded[which])
        plan = make_plan(problem)
        problem, engine = plan.applied(problem), build_engine(plan.engine)
        x = setup.x0.clone().requires_grad_(True)
        opt, state = setup.adam(x), engine.init(problem, (x.detach(),))
        times, xs, began = [], [], time.perf_counter()
        for _ in range(setup.steps):
            result = engine.hypergrad(problem, (x.detach(),), state, problem.upper.batch())
            state = result.state
            x.grad = result.grad[0]
            opt.step()
            times.append(time.perf_counter() - began)
            xs.append(x.detach().clone())
        return times, xs, engine.lower_solution(problem, (x.detach(),), state)
    return go


def _torchopt(setup: Setup) -> Callable[[], tuple[list[float], list[torch.Tensor], Tree]]:
    import torchopt

    def optimality(w: Tree, x: torch.Tensor) -> Tree:
        return torch.func.grad(lambda ww: setup.task.lower(x, ww, setup.train))(w)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=20))
    def solve(w: Tree, x: torch.Tensor) -> Tree:
        with torch.enable_grad():
            return setup.gd(x.detach(), w)

    def go() -> tuple[list[float], list[torch.Tensor], Tree]:
        x = setup.x0.clone().requires_grad_(True)
        opt, w = setup.adam(x), setup.w0
        times, xs, began = [], [], time.perf_counter()
        for _ in range(setup.steps):
            w = tuple(solve(tuple(p.detach() for p in w), x))
            opt.zero_grad()
            setup.task.upper(w, setup.val).backward()
            opt.step()
            times.append(time.perf_counter() - began)
            xs.append(x.detach().clone())
        return times, xs, tuple(p.detach() for p in setup.gd(x.detach(), w))
    return go


def _higher(setup: Setup) -> Callable[[], tuple[list[float], list[torch.Tensor], Tree]]:
    import higher

    def go() -> tuple[list[float], list[torch.Tensor], Tree]:
        x = setup.x0.clone().requires_grad_(True)
        opt = setup.adam(x)
        module = torch.nn.Linear(setup.w0[0].shape[1], setup.w0[0].shape[0]).to(setup.x0.dtype)
        with torch.no_grad():
            module.weight.copy_(setup.w0[0])
            module.bias.copy_(setup.w0[1])
        inner = torch.optim.SGD(module.parameters(), lr=setup.solver.lr)
        times, xs, began = [], [], time.perf_counter()
        for _ in range(setup.steps):
            with higher.innerloop_ctx(module, inner, copy_initial_weights=True) as (fm, diffopt):
                for _ in range(setup.solver.steps):
                    diffopt.step(setup.task.lower(x, (fm.weight, fm.bias), setup.train))
                opt.zero_grad()
                setup.task.upper((fm.weight, fm.bias), setup.val).backward()
                with torch.no_grad():  # warm start: the next unroll starts where this one ended
                    module.weight.copy_(fm.weight)
                    module.bias.copy_(fm.bias)
            opt.step()
            times.append(time.perf_counter() - began)
            xs.append(x.detach().clone())
        return times, xs, (module.weight.detach().clone(), module.bias.detach().clone())
    return go


class Evaluator:
    """F(x, y*(x)) with y* solved to convergence in float64, warm-started along a trajectory."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.train = {k: v.double() if v.is_floating_point() else v for k, v in setup.train.items()}
        self.val = {k: v.double() if v.is_floating_point() else v for k, v in setup.val.items()}
        self.restart()

    def __call__(self, x: torch.Tensor) -> float:
        w = tuple(p.clone().requires_grad_(True) for p in self.w)
        lbfgs = torch.optim.LBFGS(w, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")
        x = x.double()

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            loss = self.setup.task.lower(x, w, self.train)
            loss.backward()
            return loss

        lbfgs.step(closure)
        self.w = tuple(p.detach() for p in w)
        with torch.no_grad():
            return float(self.setup.task.upper(self.w, self.val))

    def restart(self) -> None:
        """The next solve starts from the lower level's initial values, not the last solution."""
        self.w = tuple(p.double() for p in self.setup.w0)

    def test_accuracy(self, x: torch.Tensor) -> float:
        """Test accuracy of y*(x), the lower level solved to convergence in float64 from the start."""
        self.restart()
        self(x)
        return self.setup.task.accuracy(self.w)

    def losses(self, xs: list[torch.Tensor], target: float | None = None) -> list[float]:
        """Along xs (stopping after the first at or below target, when given)."""
        self.restart()
        out = []
        for x in xs:
            out.append(self(x))
            if target is not None and out[-1] <= target:
                break
        return out


def methods_of(setup: Setup) -> dict[str, Callable[[], tuple[list[float], list[torch.Tensor], Tree]]]:
    return {"ours, auto": _ours(setup, "auto"), "ours, fixed steps": _ours(setup, "fixed"),
            "TorchOpt custom_root": _torchopt(setup), "higher unrolled": _higher(setup)}


def run_task(key: str, rounds: int, steps: int | None) -> dict[str, Any]:
    setup = Setup(TASKS[key], steps)
    methods = methods_of(setup)
    evaluate = Evaluator(setup)
    initial = evaluate.losses([setup.x0])[0]
    pilot = {name: evaluate.losses(call()[1]) for name, call in methods.items()}  # untimed: the target
    worst_best = max(min(curve) for curve in pilot.values())
    target = worst_best + 0.01 * (initial - worst_best)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, call in methods.items():
            times, xs, w = call()
            curve = evaluate.losses(xs, target)
            reached = len(curve) - 1 if curve[-1] <= target else None
            runs[name].append({"time_to_target_s": times[reached] if reached is not None else float("nan"),
                               "steps_to_target": reached + 1 if reached is not None else float("nan"),
                               "total_s": times[-1], "test_accuracy": setup.task.accuracy(w),
                               "test_accuracy_exact": evaluate.test_accuracy(xs[-1])})
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    plan = make_plan(compile_spec(setup.loaded["auto"]))
    return {"task": setup.task.name, "preset": setup.task.path, "initial_loss": initial, "target": target,
            "steps": setup.steps, "inner_solver": plan.inner_solver.model_dump(mode="json") if plan.inner_solver else None,
            "runs": runs, "median": summary}


def table(result: dict[str, Any]) -> str:
    med = result["median"]
    base = {"TorchOpt": med["TorchOpt custom_root"]["time_to_target_s"],
            "fixed": med["ours, fixed steps"]["time_to_target_s"]}
    solver = result["inner_solver"]["name"] if result["inner_solver"] else "as declared"
    lines = [f"**{result['task']}** ({result['preset']}; {result['steps']} outer steps; target validation loss"
             f" {result['target']:.4f}, from {result['initial_loss']:.4f}; auto chose {solver})", "",
             "| method | time to target (s) | outer steps to target | total time (s) | final test accuracy |"
             " test accuracy of y*(x_T) | vs TorchOpt | vs ours fixed |", "|---|---|---|---|---|---|---|---|"]
    for name in METHODS:
        m = med[name]
        t = m["time_to_target_s"]
        lines.append(f"| {name} | {t:.2f} | {m['steps_to_target']:.0f} | {m['total_s']:.2f} | {m['test_accuracy']:.4f} |"
                     f" {m['test_accuracy_exact']:.4f} | {base['TorchOpt'] / t:.2f}x | {base['fixed'] / t:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default: the preset's run.steps)")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {key: run_task(key, args.rounds, args.steps) for key in args.tasks}
    from benchmarks.time_to_target_scaling import scaling_table

    scaling = None if args.no_scaling else scaling_table()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.rounds} interleaved rounds\n")
    for result in results.values():
        print(table(result) + "\n")
    if scaling is not None:
        print(scaling["markdown"])
    if args.json is not None:
        write_json(args.json, {"results": results, "scaling": scaling})


if __name__ == "__main__":
    main()
