"""Trees of levels: several lower levels under one parent, each solved given its ancestors, the
hypergradient the sum of the children's contributions. The implicit and unrolled engines against
the closed forms of a star (one upper level, three children of different sizes and inner steps)
and of a depth-3 tree (problems/toy/tree.py) to 1e-10 in float64, and against central
differences of the composed solution map on a non-quadratic tree; what each objective sees;
the planner and bad input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel import build_engine, compile_spec, make_plan, run
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.spec import SpecError, spec_from_data
from oracles import rel_error
from problems.toy.tree import star_closed_form, star_spec, tree_closed_form, tree_spec

sys.path.insert(0, str(Path(__file__).parent / "runtime_data"))
from nonquadratic_chain import tree_spec as nonquadratic_tree  # noqa: E402

ENGINES = {"implicit": ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=8)), "unrolled": UnrolledConfig()}


def _hypergrad(data: dict[str, Any], config: Any) -> tuple[Any, Any, tuple]:
    problem = compile_spec(spec_from_data(data))
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init)
    return problem, engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()), x


@pytest.mark.parametrize("name", ENGINES)
def test_a_star_of_three_children_matches_the_closed_form(name: str) -> None:
    problem, out, x = _hypergrad(star_spec(), ENGINES[name])
    assert problem.shape == "top -> (child0, child1, child2)"
    exact = star_closed_form(x[0])
    assert rel_error(out.grad[0], exact["hypergrad"]) < 1e-10
    for i, y in enumerate(problem.split(out.state.lower)):  # each child's own solution, sizes 3, 4, 5
        assert y[0].shape == exact[f"y{i}"].shape and rel_error(y[0], exact[f"y{i}"]) < 1e-10
    assert set(out.stats.extra) == {"inner_residual.child0", "inner_residual.child1", "inner_residual.child2"}
    assert out.stats.inner_steps == 40 + 60 + 80  # each child its own steps


@pytest.mark.parametrize("name", ENGINES)
def test_a_depth_three_tree_matches_the_closed_form(name: str) -> None:
    problem, out, x = _hypergrad(tree_spec(), ENGINES[name])
    assert problem.shape == "top -> (middle -> bottom, side)"
    exact = tree_closed_form(x[0])
    assert rel_error(out.grad[0], exact["hypergrad"]) < 1e-10
    b, c, s = problem.split(out.state.lower)
    assert rel_error(b[0], exact["b"]) < 1e-10 and rel_error(c[0], exact["c"]) < 1e-10 and rel_error(s[0], exact["s"]) < 1e-10


def _composed_fd(problem: Any, engine: Any, eps: float = 1e-5) -> torch.Tensor:
    x = problem.fresh(problem.upper.init)

    def composed(a: torch.Tensor) -> float:
        y = engine.lower_solution(problem, (a,), engine.init(problem, (a,)))
        return float(problem.upper_objective((a,), y, None))

    basis = torch.eye(x[0].numel(), dtype=torch.float64)
    return torch.tensor([(composed(x[0] + eps * e) - composed(x[0] - eps * e)) / (2 * eps) for e in basis], dtype=torch.float64)


@pytest.mark.parametrize("name", ENGINES)
def test_a_non_quadratic_tree_matches_finite_differences(name: str) -> None:
    config = ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=4)) if name == "implicit" else UnrolledConfig()
    problem, out, _ = _hypergrad(nonquadratic_tree(steps=40), config)
    assert problem.shape == "level0 -> (level1 -> level3, level2)"
    assert rel_error(out.grad[0], _composed_fd(problem, build_engine(config))) < 1e-7


def test_each_level_sees_its_ancestors_and_its_subtree_only() -> None:
    problem = compile_spec(spec_from_data(tree_spec()))
    names = [level.name for level in problem.chain]
    assert names == ["top", "middle", "bottom", "side"]  # preorder
    params = [level.init for level in problem.chain]
    seen = {}
    for k, level in enumerate(problem.chain):
        upper, lower = problem.views(k, params)
        seen[level.name] = (sorted(upper), sorted(lower))
    assert seen["top"] == (["a"], ["b", "c", "s"])
    assert seen["middle"] == (["a"], ["b", "c"])  # not the side level
    assert seen["bottom"] == (["a", "b"], ["c"])
    assert seen["side"] == (["a"], ["s"])  # not middle's subtree


def test_the_planner_takes_nested_implicit_for_a_strongly_convex_tree_and_says_it_is_a_tree() -> None:
    plan = make_plan(compile_spec(spec_from_data(star_spec())))
    assert plan.engine.kind == "implicit"
    assert "tree of 4, top -> (child0, child1, child2)" in plan.reasons[0] and "sum of its children's contributions" in plan.reasons[0]
    data = star_spec(engine={"kind": "penalty"})
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert info.value.issues[0].path == "engine.kind" and "top -> (child0, child1, child2)" in info.value.issues[0].message


def test_a_tree_runs_and_reaches_a_lower_upper_loss(tmp_path: Path) -> None:
    data = star_spec()
    data["run"].update(steps=20)
    result = run(spec_from_data(data), out=tmp_path, progress=False)
    assert result.result["status"] == "completed" and result.result["engine"] == "implicit"
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["upper_loss"] < records[0]["upper_loss"]


BAD = {
    "children sharing a variable name": (lambda d: d["levels"]["child1"].update(variables={"y0": {"shape": [4]}}),
                                        "levels", "declared in both levels"),
    "constraints in a tree": (lambda d: d["levels"]["child0"].update(constraints=[{"fn": "problems.toy.tree:child_objective"}]),
                              "levels.child0.constraints", "not supported"),
    "tuned by a sibling": (lambda d: (d["levels"]["child0"]["variables"].update(h={"shape": [], "init": 0.1}),
                                      d["levels"]["child1"]["solver"].update(tuned={"lr": "h"})),
                           "levels.child1.solver.tuned.lr", "not a tensor variable of a level above"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_tree_input_names_the_field(case: str) -> None:
    data = star_spec()
    mutate, path, message = BAD[case]
    mutate(data)
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert any(issue.path == path and message in issue.message for issue in info.value.issues), str(info.value)
