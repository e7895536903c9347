"""Cost and accuracy of one multilevel hypergradient: nested implicit vs nested unrolled.

    python benchmarks/multilevel.py [--repeats 5] [--json out.json]

Two tables. Runs: the preset toy/three_level run to its end (60 outer steps) with each engine and
T in {10, 20} warm-started inner steps per lower level; the relative distance of the final a to
the closed-form optimum a*. One hypergradient: the three-level quadratic toy (problems/toy/three_level.py) with T cold-started inner steps
per lower level, for T in {10, 20, 40} (relative error against the closed form); the preset
hpo_reweight/digits at its own settings (warm state after one call; relative difference between
the engines); and a four-level non-quadratic chain (tests/runtime_data/nonquadratic_chain.py)
with T = 10. Ablation (``--ablation``): nested unrolling on the three-level non-quadratic chain
with and without grad_and_value's ``stop_at`` (which keeps each step's gradient call from
walking the graph of the earlier steps), T in {10, 20} warm-started. Each time is the median of ``--repeats`` calls after a warm-up, the engines timed
round-robin (one call of each per round) so that background load falls on both alike. Prints a
markdown table last; ``--json`` writes the figures."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import tempfile
from contextlib import contextmanager
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "runtime_data"))

from benchmarks._common import write_json  # noqa: E402
from bilevel import run  # noqa: E402
from bilevel.compile import compile_spec  # noqa: E402
from bilevel.multilevel import build_chain_engine  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from nonquadratic_chain import chain_spec  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402
from problems.toy.three_level import three_level_closed_form, three_level_spec  # noqa: E402


def _cases() -> list[tuple[str, Any, dict[str, Any], Any]]:
    """(label, problem, engine configs, reference function of (x, grads) -> relative errors)."""
    cases = []
    for steps in (10, 20, 40):
        problem = compile_spec(three_level_spec(middle_steps=steps, bottom_steps=steps))
        exact = three_level_closed_form(problem.upper.init[0])["hypergrad"]
        configs = {"implicit": ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=4)), "unrolled": UnrolledConfig()}
        cases.append((f"toy, 3 levels, T = {steps}", problem, configs, exact))
    problem = compile_spec(load_spec(find_preset("hpo_reweight/digits")), "cpu")
    configs = {"implicit": ImplicitConfig(), "unrolled": UnrolledConfig()}
    cases.append(("hpo_reweight/digits (600 + 650 lower scalars)", problem, configs, None))
    problem = compile_spec(chain_spec(depth=4, steps=10))
    configs = {"implicit": ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=3)), "unrolled": UnrolledConfig()}
    cases.append(("non-quadratic, 4 levels, T = 10", problem, configs, None))
    return cases


def runs_to_optimum() -> list[dict[str, Any]]:
    """The toy preset run to its end per engine and inner horizon; distance of a to a*."""
    rows = []
    for config in (ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=4)), UnrolledConfig()):
        for steps in (10, 20):
            overrides = [f"levels.middle.solver.steps={steps}", f"levels.bottom.solver.steps={steps}", "run.checkpoint_every=null"]
            began = time.perf_counter()
            result = run(load_spec(find_preset("toy/three_level"), overrides=overrides), engine=config,
                         out=tempfile.mkdtemp(), progress=False).result
            a = torch.tensor(result["upper_variables"]["a"], dtype=torch.float64)
            a_star = three_level_closed_form(a)["a_star"]
            rows.append({"engine": config.kind, "inner_steps": steps, "outer_steps": result["steps"],
                         "relative_error_a": float((a - a_star).norm() / a_star.norm()), "wall_time_s": time.perf_counter() - began})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


@contextmanager
def _without_stop_at():
    """grad_and_value with its stop_at argument ignored, where the unrolled engines call it."""
    from bilevel.engines import inner
    from bilevel.linalg.hvp import grad_and_value
    from bilevel.multilevel import unrolled

    def plain(fn: Any, params: Any, create_graph: bool = False, stop_at: Any = ()) -> Any:
        return grad_and_value(fn, params, create_graph=create_graph)

    with mock.patch.object(inner, "grad_and_value", plain), mock.patch.object(unrolled, "grad_and_value", plain):
        yield


def ablation(repeats: int) -> list[dict[str, Any]]:
    """Nested unrolling with and without stop_at, round-robin; the hypergradients must agree."""
    rows = []
    for steps in (10, 20):
        problem = compile_spec(chain_spec(depth=3, steps=steps, warm_start=True))
        engine = build_chain_engine(UnrolledConfig())
        x = problem.fresh(problem.upper.init)
        times: dict[str, list[float]] = {"with stop_at": [], "without": []}
        grads: dict[str, torch.Tensor] = {}
        for _ in range(repeats + 1):  # the first round is a warm-up
            for name in times:
                with (_without_stop_at() if name == "without" else mock.patch.dict({})):
                    began = time.perf_counter()
                    grads[name] = engine.hypergrad(problem, x, engine.init(problem, x), None).grad[0]
                    times[name].append(time.perf_counter() - began)
        difference = float((grads["with stop_at"] - grads["without"]).norm() / grads["without"].norm())
        for name, values in times.items():
            rows.append({"steps": steps, "nest": steps + (steps + 1) * steps, "variant": name,
                         "median_ms": 1e3 * statistics.median(values[1:]), "relative_difference": difference})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def measure(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for label, problem, configs, exact in _cases():
        engines = {name: build_chain_engine(config) for name, config in configs.items()}
        x = problem.fresh(problem.upper.init)
        batch = problem.upper.data.full if problem.upper.data is not None else None
        states = {name: engine.init(problem, x) for name, engine in engines.items()}
        outputs: dict[str, Any] = {}
        for name, engine in engines.items():  # warm-up; also moves the warm-started state off the initial values
            outputs[name] = engine.hypergrad(problem, x, states[name], batch)
            states[name] = outputs[name].state
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(repeats):
            for name, engine in engines.items():
                began = time.perf_counter()
                outputs[name] = engine.hypergrad(problem, x, states[name], batch)
                times[name].append(time.perf_counter() - began)
        grads = {name: torch.cat([g.reshape(-1) for g in out.grad]) for name, out in outputs.items()}
        for name, out in outputs.items():
            if exact is not None:
                error = float((grads[name] - exact).norm() / exact.norm())
            else:
                other = grads["unrolled" if name == "implicit" else "implicit"]
                error = float((grads[name] - other).norm() / other.norm())
            rows.append({
                "case": label, "engine": name, "median_ms": 1e3 * statistics.median(times[name]),
                "hvp_count": out.stats.hvp_count, "inner_steps": out.stats.inner_steps,
                "inner_residual": float(out.stats.inner_residual), "error": error,
                "error_vs": "closed form" if exact is not None else "the other engine",
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ablation", action="store_true", help="only the stop_at ablation")
    args = parser.parse_args()
    if args.ablation:
        rows = ablation(args.repeats)
        print(markdown_table(["T per level", "steps in the nest", "variant", "median ms", "relative difference of the hypergradients"],
                             ([r["steps"], r["nest"], r["variant"], f"{r['median_ms']:.0f}", f"{r['relative_difference']:.1e}"] for r in rows)))
        if args.json is not None:
            write_json(args.json, rows)
        return
    runs = runs_to_optimum()
    rows = measure(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64 (toys) / float32 (digits)")
    print(markdown_table(["engine", "inner steps per lower level", "outer steps", "relative distance of a to a*", "wall time (s)"],
                         ([r["engine"], r["inner_steps"], r["outer_steps"], f"{r['relative_error_a']:.1e}", f"{r['wall_time_s']:.1f}"]
                          for r in runs)))
    print()
    print(markdown_table(["case", "engine", "median ms", "HVP count", "inner steps", "inner residual", "relative error"],
                         ([r["case"], r["engine"], f"{r['median_ms']:.0f}", r["hvp_count"], r["inner_steps"], f"{r['inner_residual']:.1e}",
                           f"{r['error']:.1e} (vs {r['error_vs']})"] for r in rows)))
    if args.json is not None:
        write_json(args.json, {"runs": runs, "hypergradients": rows})


if __name__ == "__main__":
    main()
