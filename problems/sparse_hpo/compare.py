"""Hypergradients of the sparse-HPO problems by every engine and linear solver that takes them,
against the closed form on the active set, and JAXopt's numbers for its two examples.

    python problems/sparse_hpo/compare.py [--json out.json]

Rows: the lasso and the elastic net (prox form, strengths l1 = 0.1, l2 = 0.05 as plain tensors),
the lasso on boxes (w = u - v, u, v >= 0), each at the start of problems.sparse_hpo's synthetic
regression (60 train / 40 validation examples, 20 features, 5 nonzero), inner solves cold-started
and converged; then JAXopt's lasso (diabetes, d/dtheta at theta = 1) and sparse-coding (the norm of
dF/dD) examples (tests/test_jaxopt_examples.py holds JAXopt 0.8.5's numbers)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bilevel.compile import compile_spec  # noqa: E402
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig, build_engine  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.sparse_hpo import lasso_hypergrad, regression_data, sparse_hpo_spec  # noqa: E402

CONFIGS = {
    "implicit cg": ImplicitConfig(),
    "implicit direct": ImplicitConfig(linear_solver=LinearSolverSpec(method="direct")),
    "implicit neumann (300)": ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=300)),
    "unrolled (every step)": UnrolledConfig(),
}


def _call(problem: Any, config: Any) -> tuple[Any, float]:
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init)
    started = time.perf_counter()
    result = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    train, val = regression_data("train"), regression_data("val")
    for name, kwargs, l2 in (("lasso", {}, None), ("elastic net", {"l2": 0.05}, 0.05), ("lasso on boxes", {"form": "split"}, None)):
        exact = lasso_hypergrad(0.1, l2 or 0.0, train, val)
        if kwargs.get("form") == "split":
            kwargs = {**kwargs, "inner_steps": 1500, "inner_lr": 0.25}
        problem = compile_spec(sparse_hpo_spec(**kwargs))
        want = [float(exact.d_l1)] + ([] if l2 is None else [float(exact.d_l2)])
        for label, config in CONFIGS.items():
            result, seconds = _call(problem, config)
            got = [float(g) for g in result.grad]
            error = max(abs(a - b) / abs(b) for a, b in zip(got, want))
            rows.append({"problem": name, "engine": label, "hypergradient": got, "closed_form": want, "rel_error": error,
                         "inner_residual": float(result.stats.inner_residual), "nonzeros": f"{int(exact.active.sum())}/20",
                         "time_s": seconds})
    for preset in ("diabetes_lasso", "sparse_coding"):
        problem = compile_spec(load_spec(find_preset(f"sparse_hpo/{preset}")), "cpu")
        result, seconds = _call(problem, ImplicitConfig())
        value = float(result.grad[0]) if preset == "diabetes_lasso" else float(result.grad[0].norm())
        rows.append({"problem": f"JAXopt {preset}", "engine": "implicit cg", "hypergradient": [value],
                     "closed_form": None, "rel_error": None, "inner_residual": float(result.stats.inner_residual),
                     "nonzeros": None, "time_s": seconds})
    print("| problem | engine | dF/dl | closed form | rel. error | inner residual | time |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        fmt = lambda v: ", ".join(f"{x:.10g}" for x in v) if v else "-"  # noqa: E731
        err = "-" if row["rel_error"] is None else f"{row['rel_error']:.1e}"
        print(f"| {row['problem']} | {row['engine']} | {fmt(row['hypergradient'])} | {fmt(row['closed_form'])} | {err}"
              f" | {row['inner_residual']:.1e} | {row['time_s']:.2f} s |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
