"""Reference hypergradients (float64), recorded once and compared bit for bit.

Every case compiles a problem, builds an engine and takes a few successive warm-started calls at
the initial upper variables (so that the engine state carried between calls matters too), or
runs a few outer steps with ``bilevel.run``. The figures (hypergradient or search direction,
upper loss, lower solution) are written with ``repr`` precision, which round-trips float64
exactly, to ``tests/data/reference_hypergrads.json``; ``tests/test_reference_hypergrads.py``
recomputes each case and requires equality to the last bit.

    python benchmarks/reference_hypergrads.py            # print a table of the cases
    python benchmarks/reference_hypergrads.py --record   # (re)write the stored figures

Re-record only when a change is meant to alter the numbers, and say so in the commit."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "runtime_data"))

from bilevel import build_engine, compile_spec, make_plan, run  # noqa: E402
from bilevel.engines import (  # noqa: E402
    BORepConfig,
    DartsConfig,
    ImplicitConfig,
    LinearSolverSpec,
    LVHBAConfig,
    PenaltyConfig,
    RartsConfig,
    StnConfig,
    UnrolledConfig,
)
from bilevel.spec import load_spec, spec_from_data  # noqa: E402

STORE = ROOT / "tests" / "data" / "reference_hypergrads.json"


def _quadratic(**kw: Any) -> Any:
    from problems.toy import quadratic_spec

    return quadratic_spec(**kw)


def _quadratic_with(solver: dict[str, Any], **kw: Any) -> Any:
    data = _quadratic(**kw).model_dump(mode="json")
    data["levels"]["lower"]["solver"].update(solver)
    return spec_from_data(data)


def _ridge(**kw: Any) -> Any:
    from problems.toy import ridge_spec

    return ridge_spec(**kw)


def _stn() -> Any:
    from problems.toy.stn import quadratic_stn_spec

    return quadratic_stn_spec(steps=5, checkpoint_every=None)


def _darts_toy() -> Any:
    from problems.nas.toy import toy_spec

    return toy_spec(steps=5, inner_lr=0.02, outer_lr=0.02)


def _three_level() -> Any:
    from problems.toy.three_level import three_level_spec

    return three_level_spec()


def _nonquadratic_chain() -> Any:
    from nonquadratic_chain import chain_spec

    return chain_spec()


def _constrained() -> Any:
    return load_spec(ROOT / "problems" / "constrained_toy" / "lv_hba.yaml", ["run.device=cpu"])


def _digits() -> Any:
    return load_spec(ROOT / "problems" / "hyperclean" / "digits.yaml", ["run.dtype=float64", "run.device=cpu"])


def _instances() -> Any:
    kwargs = {"dataset": "mixture", "n_train": 90, "n_val": 90, "d": 10, "classes": 4, "seed": 0}
    return spec_from_data({
        "name": "instances-reference",
        "levels": {
            "upper": {"variables": {"lam": {"shape": [90], "init": 0.0}}, "objective": "problems.hyperclean:upper_objective",
                      "data": {"source": "problems.hyperclean:val_data", "kwargs": kwargs},
                      "solver": {"name": "adam", "lr": 0.1}},
            "lower": {"parent": "upper", "variables": {"W": {"shape": [4, 10], "init": "normal", "init_scale": 0.1},
                                                        "b": {"shape": [4]}},
                      "objective": "problems.hyperclean:lower_objective", "objective_kwargs": {"mu": 1e-2},
                      "data": {"source": "problems.hyperclean:train_data", "kwargs": kwargs},
                      "solver": {"name": "sgd", "lr": 0.2, "steps": 15, "warm_start": True},
                      "assumptions": {"convexity": "strongly_convex"}},
        },
        "run": {"device": "cpu", "dtype": "float64", "seed": 0, "steps": 3},
        "instances": {"count": 3, "vary": {"levels.lower.data.kwargs.seed": [0, 1, 2],
                                           "levels.lower.objective_kwargs.mu": [1e-2, 3e-2, 1e-1],
                                           "levels.upper.variables.lam.init": [0.0, 0.5, -0.5]}},
    })


CG4 = ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=4))

# name -> (spec builder, engine config, successive calls)
CALLS: dict[str, tuple[Callable[[], Any], Any, int]] = {
    "quadratic/implicit-cg": (lambda: _quadratic(inner_steps=400), ImplicitConfig(), 2),
    "quadratic/implicit-direct": (lambda: _quadratic(inner_steps=400), ImplicitConfig(linear_solver=LinearSolverSpec(method="direct")), 2),
    "quadratic/implicit-neumann": (lambda: _quadratic(inner_steps=400),
                                   ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=600, neumann_lr=0.09)), 2),
    "quadratic/implicit-forward-hvp": (lambda: _quadratic(inner_steps=400), ImplicitConfig(hvp="forward"), 2),
    "quadratic/unrolled": (lambda: _quadratic(inner_steps=50), UnrolledConfig(), 2),
    "quadratic/unrolled-checkpointed": (lambda: _quadratic(inner_steps=50), UnrolledConfig(checkpoint_every=7), 2),
    "quadratic/unrolled-truncated": (lambda: _quadratic(inner_steps=50), UnrolledConfig(truncate=20, checkpoint_every=6), 2),
    "quadratic/unrolled-momentum": (lambda: _quadratic_with({"name": "momentum", "lr": 0.02}, inner_steps=30), UnrolledConfig(), 2),
    "quadratic/unrolled-adam-checkpointed": (lambda: _quadratic_with({"name": "adam", "lr": 0.05}, inner_steps=30),
                                             UnrolledConfig(checkpoint_every=8), 2),
    "quadratic/implicit-adam-inner": (lambda: _quadratic_with({"name": "adam", "lr": 0.05, "warm_start": True}, inner_steps=30),
                                      ImplicitConfig(), 2),
    "quadratic/penalty": (lambda: _quadratic(inner_steps=20), PenaltyConfig(gamma_max=30.0, lower_lr=0.09, omega_lr=0.09), 3),
    "quadratic/bo_rep": (lambda: _quadratic(inner_steps=20), BORepConfig(z_lr=0.09, lower_steps=10, update_every=2), 3),
    "quadratic/lv_hba": (lambda: _quadratic(inner_steps=20), LVHBAConfig(lower_lr=0.05, eta=0.05), 3),
    "quadratic/darts-1": (lambda: _quadratic(inner_steps=1), DartsConfig(order=1), 3),
    "quadratic/darts-2": (lambda: _quadratic(inner_steps=1), DartsConfig(order=2), 3),
    "quadratic/darts-2-exact": (lambda: _quadratic(inner_steps=1), DartsConfig(order=2, hessian="exact"), 3),
    "ridge-per-feature/implicit": (lambda: _ridge(per_feature=True), ImplicitConfig(), 2),
    "ridge-per-feature/unrolled": (lambda: _ridge(per_feature=True, inner_steps=60), UnrolledConfig(), 2),
    "ridge-scalar/implicit-direct": (lambda: _ridge(per_feature=False), ImplicitConfig(linear_solver=LinearSolverSpec(method="direct")), 2),
    "ridge-scalar/unrolled-checkpointed": (lambda: _ridge(per_feature=False, inner_steps=60), UnrolledConfig(checkpoint_every=7), 2),
    "darts-toy/rarts": (_darts_toy, RartsConfig(lam=10.0, beta=10.0), 3),
    "quadratic-stn/stn": (_stn, StnConfig(), 3),
    "constrained-toy/lv_hba": (_constrained, LVHBAConfig(), 3),
    "three-level/implicit-cg": (_three_level, CG4, 2),
    "three-level/implicit-neumann": (_three_level, ImplicitConfig(linear_solver=LinearSolverSpec(method="neumann", maxiter=60)), 1),
    "three-level/unrolled": (_three_level, UnrolledConfig(), 1),
    "nonquadratic-chain/implicit-cg": (_nonquadratic_chain, CG4, 1),
    "nonquadratic-chain/unrolled": (_nonquadratic_chain, UnrolledConfig(), 1),
    "instances/implicit-cg": (_instances, ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=6)), 2),
    "instances/unrolled-checkpointed": (_instances, UnrolledConfig(checkpoint_every=4, truncate=10), 2),
    "digits/implicit-planned": (_digits, None, 2),
    "digits/unrolled": (_digits, UnrolledConfig(), 1),
}

# name -> (spec builder, engine config or None for the planner's, outer steps)
RUNS: dict[str, tuple[Callable[[], Any], Any, int]] = {
    "digits/run-planned": (_digits, None, 3),
    "quadratic/run-penalty": (lambda: _quadratic(inner_steps=20, steps=5, checkpoint_every=None), PenaltyConfig(), 5),
    "three-level/run-implicit": (_three_level, CG4, 2),
}


def _flat(values: Any) -> list[float]:
    return [v for t in values for v in t.detach().reshape(-1).tolist()]


def _build(problem: Any, config: Any) -> Any:
    return build_engine(make_plan(problem).engine if config is None else config)


def call_case(name: str) -> dict[str, Any]:
    """Successive hypergradients of one case: per call, the direction, upper loss and lower solution."""
    builder, config, calls = CALLS[name]
    spec = builder()
    problem = compile_spec(spec)
    engine = _build(problem, config)
    torch.manual_seed(0)
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    out = []
    for _ in range(calls):
        result = engine.hypergrad(problem, x, state, problem.upper.batch())
        state = result.state
        out.append({"grad": _flat(result.grad), "upper_loss": float(result.upper_loss), "lower": _flat(state.lower)})
    return {"calls": out}


def run_case(name: str) -> dict[str, Any]:
    """A few outer steps: the final upper and lower variables and the final upper loss."""
    builder, config, steps = RUNS[name]
    spec = builder()
    data = spec.spec.model_dump(mode="json") if hasattr(spec, "spec") else spec.model_dump(mode="json")
    data["run"].update(steps=steps, checkpoint_every=None)
    base = getattr(spec, "base_dir", None)
    file = getattr(spec, "file", "<python>")
    loaded = spec_from_data(data, file, base)
    with tempfile.TemporaryDirectory() as out:
        result = run(loaded, engine=config, out=out, overwrite=True, progress=False)
    return {"x": _flat(result.x), "y": _flat(result.y), "final_upper_loss": result.result["final_upper_loss"]}


def compute_all() -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name in CALLS:
        figures[name] = call_case(name)
    for name in RUNS:
        figures[name] = run_case(name)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the figures to tests/data/reference_hypergrads.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = compute_all()
    stored = json.loads(STORE.read_text()) if STORE.exists() else {}
    print(f"{'case':40s} {'values':>8s}  {'stored':>8s}")
    for name, value in figures.items():
        n = sum(len(v) for c in value.get("calls", [value]) for v in c.values() if isinstance(v, list))
        same = "-" if name not in stored else ("equal" if stored[name] == value else "DIFFERS")
        print(f"{name:40s} {n:8d}  {same:>8s}")
    if args.record:
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps({"torch": torch.__version__, **figures}, indent=None, sort_keys=True) + "\n")
        print(f"written {STORE}")


if __name__ == "__main__":
    main()
