"""The first-order penalty engine handles a lower level whose solutions are not unique (where the
implicit function theorem does not apply: the lower Hessian is singular)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilevel import compile_spec, make_plan, run
from bilevel.engines import PenaltyConfig
from bilevel.spec import spec_from_data

MODULE = str((Path(__file__).parent / "runtime_data" / "nonunique.py").resolve())


def _spec(steps: int) -> dict:
    return {
        "levels": {
            "upper": {"variables": {"x": {"shape": [], "init": 0.0}}, "objective": f"{MODULE}:upper",
                      "solver": {"name": "sgd", "lr": 0.5}},
            "lower": {"parent": "upper", "variables": {"y": {"shape": [2], "init": 0.0}}, "objective": f"{MODULE}:lower",
                      "solver": {"name": "sgd", "lr": 0.2, "steps": 0}, "assumptions": {"convexity": "nonconvex"}},
        },
        "run": {"dtype": "float64", "device": "cpu", "steps": steps, "checkpoint_every": None},
    }


def test_planner_picks_the_penalty_engine_for_a_nonunique_lower_level() -> None:
    loaded = spec_from_data(_spec(1))
    assert make_plan(compile_spec(loaded)).engine.kind == "penalty"


@pytest.mark.parametrize("gamma, tolerance", [(10.0, 0.02), (100.0, 0.003)])  # bias O(1/gamma): 0.011, 0.0011
def test_penalty_reaches_the_optimistic_solution(gamma: float, tolerance: float, tmp_path) -> None:
    result = run(spec_from_data(_spec(4000)), engine=PenaltyConfig(gamma_max=gamma, lower_lr=0.2, omega_lr=0.2), out=tmp_path, progress=False)
    x, y = float(result.x[0]), result.y[0]
    assert abs(x - 8 / 3) < tolerance
    assert abs(float(y[0]) - 4 / 3) < tolerance and abs(float(y[1]) - 4 / 3) < tolerance
