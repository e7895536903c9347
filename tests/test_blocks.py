"""A lower level of blocks: m lower problems under shared upper variables (problems/toy/blocks.py).

With every block drawn the implicit and unrolled engines match the closed-form hypergradient to
1e-10 in float64; the problem over drawn blocks is the mean of their objectives; BSVRB follows
the official code's update rules step for step (an independent loop on the closed-form
gradients), with every block drawn reaches the full-batch solution, and resumes bit-identically;
the planner and bad input."""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel import build_engine, compile_spec, make_plan, run
from bilevel.engines import BSVRBConfig, ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.problem.blocks import BlockSampler, selected_blocks
from bilevel.spec import SpecError, spec_from_data
from oracles import rel_error
from problems.toy.blocks import _arrays, blocks_closed_form, blocks_spec

M = 6


@pytest.mark.parametrize("config", [ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=8)), UnrolledConfig()],
                         ids=["implicit", "unrolled"])
def test_every_block_drawn_matches_the_closed_form(config: Any) -> None:
    problem = compile_spec(spec_from_data(blocks_spec(count=M, inner_steps=200)))
    assert problem.lower.init[0].shape == (M, 4) and problem.upper.init[0].shape == (3,)  # x shared, y per block
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init)
    out = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())
    exact = blocks_closed_form(x[0], M)
    assert rel_error(out.grad[0], exact["hypergrad"]) < 1e-10
    assert rel_error(out.state.lower[0], exact["y"]) < 1e-10
    assert abs(float(out.upper_loss) - float(exact["value"])) < 1e-10  # F is the blocks' mean


def test_the_drawn_blocks_problem_is_the_mean_of_their_objectives() -> None:
    problem = compile_spec(spec_from_data(blocks_spec(count=M, sample=2)))
    problem.upper.data.begin_outer_step()  # draws the step's blocks
    index = problem.blocks.indices
    assert index.numel() == 2
    sub = selected_blocks(problem)
    x = problem.fresh(problem.upper.init)
    y = (torch.randn(2, 4, dtype=torch.float64),)
    upper = sub.upper_objective(x, y, problem.upper.batch())
    lower = sub.lower_objective(x, y, problem.lower.batch())
    by_hand_f, by_hand_g = 0.0, 0.0
    for row, i in enumerate(index.tolist()):
        a = _arrays(i, 3, 4, 0)
        yi = y[0][row]
        by_hand_f += 0.5 * ((yi - a["c"][0]) ** 2).sum() + 0.05 * (x[0] ** 2).sum()
        by_hand_g += 0.5 * yi @ (a["A"][0] @ yi) - yi @ (a["B"][0] @ x[0])
    assert abs(float(upper) - float(by_hand_f) / 2) < 1e-12 and abs(float(lower) - float(by_hand_g)) < 1e-12


def test_block_draws_are_distinct_cover_every_block_and_resume() -> None:
    sampler = BlockSampler(10, 3, "shuffled", 0, torch.device("cpu"))
    seen = []
    for _ in range(10):
        drawn = sampler.advance().tolist()
        assert len(set(drawn)) == 3
        seen += drawn
    assert sorted(set(seen)) == list(range(10))
    state = sampler.state_dict()
    after = [sampler.advance().tolist() for _ in range(4)]
    again = BlockSampler(10, 3, "shuffled", 0, torch.device("cpu"))
    again.load_state_dict(state)
    assert [again.advance().tolist() for _ in range(4)] == after
    uniform = BlockSampler(10, 3, "uniform", 0, torch.device("cpu"))
    assert all(len(set(uniform.advance().tolist())) == 3 for _ in range(5))


def _by_the_official_rules(steps: int, sample: int, vr: bool, eta: float, tau: float, config: BSVRBConfig,
                           x0: torch.Tensor, y0: torch.Tensor, rho: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BSVRB v2 written out on the closed-form gradients, one block at a time, as the official code
    loops (Hu et al. 2023; quanqihu/BSVRB_ICML2023, Hyperparameter_Optimization/HO/main.py)."""
    arrays = [_arrays(i, 3, 4, 0) for i in range(M)]
    A, B, c = [a["A"][0] for a in arrays], [a["B"][0] for a in arrays], [a["c"][0] for a in arrays]
    sampler = BlockSampler(M, sample, "shuffled", 0, torch.device("cpu"))
    alpha, gamma, beta = (config.alpha, config.gamma, config.beta) if vr else (1.0, 0.0, 1.0)
    x, x_old = x0.clone(), x0.clone()
    w, w_old = y0.clone(), y0.clone()
    v, v_old = torch.zeros_like(w), torch.zeros_like(w)
    s, u = torch.zeros_like(w), torch.zeros_like(w)
    z = torch.zeros_like(x)
    delay = [0] * M

    def grad_g(i: int, xx: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
        return A[i] @ ww - B[i] @ xx

    def residual(i: int, ww: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        return A[i] @ vv - (ww - c[i])

    def direction(i: int, xx: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        return rho * xx + B[i].T @ vv

    for _ in range(steps):
        batch = sampler.advance().tolist()
        w_new, v_new = w.clone(), v.clone()
        g0, g1 = torch.zeros_like(x), torch.zeros_like(x)
        for i in batch:
            s[i] = (1 - alpha) * s[i] + (alpha + gamma) * grad_g(i, x, w[i]) - gamma * grad_g(i, x_old, w_old[i])
            u[i] = (1 - alpha) * u[i] + (alpha + gamma) * residual(i, w[i], v[i]) - gamma * residual(i, w_old[i], v_old[i])
            g0 += direction(i, x_old, v_old[i])
            g1 += direction(i, x, v[i])
        for i in range(M):
            if i in batch:
                dc = delay[i] + 1 if vr else 1
                w_new[i] = w_new[i] - tau * dc * s[i]
                candidate = v_new[i] - tau * dc * u[i]
                norm = candidate.norm()
                v_new[i] = candidate / norm * config.v_bound if norm > config.v_bound else candidate
                delay[i] = 0
            else:
                delay[i] += 1
        x_old = x.clone()
        z = (1 - beta) * (z - g0 / sample) + g1 / sample
        x = x - eta * z
        w_old, w = w, w_new
        v_old, v = v, v_new
    return x, w


@pytest.mark.parametrize("vr", [True, False], ids=["bsvrb", "plain"])
def test_bsvrb_follows_the_official_update_rules(vr: bool, tmp_path: Path) -> None:
    config = BSVRBConfig(variance_reduction=vr, v_bound=1.5)  # a small ball: the projection acts
    data = blocks_spec(count=M, sample=2, engine=config.model_dump(mode="json"), steps=12, lr=0.05, lower_lr=0.2)
    problem = compile_spec(spec_from_data(data))
    x0, y0 = problem.upper.init[0].clone(), problem.lower.init[0].clone()
    result = run(spec_from_data(data), out=tmp_path, progress=False)
    x, w = _by_the_official_rules(12, 2, vr, 0.05, 0.2, config, x0, y0)
    assert rel_error(result.x[0], x) < 1e-12 and rel_error(result.y[0], w) < 1e-12


def test_bsvrb_with_every_block_drawn_reaches_the_full_batch_solution(tmp_path: Path) -> None:
    data = blocks_spec(count=M, engine={"kind": "bsvrb"}, steps=500, lr=0.1, lower_lr=0.3)
    result = run(spec_from_data(data), out=tmp_path, progress=False)
    x_star = blocks_closed_form(result.x[0], M)["x_star"]
    assert rel_error(result.x[0], x_star) < 1e-8  # the documented tolerance (docs/engines/bsvrb.md)
    exact = blocks_closed_form(x_star, M)
    assert rel_error(result.y[0], exact["y"]) < 1e-8


def test_a_sampled_bsvrb_run_resumes_bit_identically(tmp_path: Path) -> None:
    data = blocks_spec(count=M, sample=2, engine={"kind": "bsvrb"}, steps=8, lr=0.05, lower_lr=0.2)
    data["run"]["checkpoint_every"] = 4
    reference = run(spec_from_data(data), out=tmp_path / "ref", progress=False)
    short = {**data, "run": {**data["run"], "steps": 4}}
    run(spec_from_data(short), out=tmp_path / "resumed", progress=False)
    resumed = run(spec_from_data(data), out=tmp_path / "resumed", resume=True, progress=False)
    assert torch.equal(resumed.x[0], reference.x[0]) and torch.equal(resumed.y[0], reference.y[0])


def test_the_planner_samples_blocks_with_bsvrb_and_solves_every_block_drawn_exactly() -> None:
    plan = make_plan(compile_spec(spec_from_data(blocks_spec(count=M, sample=2))))
    assert plan.engine.kind == "bsvrb" and "levels.block.blocks: 2 of 6 blocks" in plan.reasons[0]
    plan = make_plan(compile_spec(spec_from_data(blocks_spec(count=M))))
    assert plan.engine.kind == "implicit"


BAD = {
    "sample above count": (lambda d: d["levels"]["block"]["blocks"].update(sample=9), "levels.block.blocks.sample",
                           "exceeds count"),
    "sampled blocks on implicit": (lambda d: (d["levels"]["block"]["blocks"].update(sample=2), d.update(engine={"kind": "implicit"})),
                                   "levels.block.blocks.sample", "only with every block drawn"),
    "bsvrb without blocks": (lambda d: (d["levels"]["block"].pop("blocks"), d.update(engine={"kind": "bsvrb"})),
                             "levels.block", "declare levels.block.blocks"),
    "shared variables varying": (lambda d: d["levels"]["block"]["blocks"]["vary"].update({"levels.shared.variables.x.init": "index"}),
                                 "levels.block.blocks.vary.levels.shared.variables.x.init", "shared by all blocks"),
    "a vary list of the wrong length": (lambda d: d["levels"]["block"]["blocks"]["vary"].update({"levels.block.data.kwargs.block": [0, 1]}),
                                        "levels.block.blocks.vary", "one per block"),
    "blocks with instances": (lambda d: d.update(instances={"count": 2}), "instances", "cannot be combined"),
    "blocks on the top": (lambda d: d["levels"]["shared"].update(blocks={"count": 2}), "levels.shared.blocks",
                          "the top level"),
    "penalty on blocks": (lambda d: d.update(engine={"kind": "penalty"}), "levels.block.blocks", "does not support a batch of blocks"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_blocks_input_names_the_field(case: str) -> None:
    data = blocks_spec(count=M)
    mutate, path, message = BAD[case]
    mutate(data)
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(spec_from_data(data)))
    assert any(issue.path == path and message in issue.message for issue in info.value.issues), str(info.value)


@pytest.mark.parametrize("family", ["hyperrep", "l2"])
@pytest.mark.parametrize("method", ["bsvrb", "plain", pytest.param("implicit", marks=pytest.mark.slow)])
def test_the_multiblock_comparison_runs_each_method_and_the_upper_loss_falls(family: str, method: str, tmp_path: Path) -> None:
    """problems.multiblock.compare at a small budget: the method runs at its tuned rates, the
    curve is in block-solves, and the monitored upper loss falls below its first value."""
    from problems.multiblock.compare import run_method, table

    row = run_method(family, method, 0, 300, 3, tmp_path, examples=10)
    steps = [point[0] for point in row["curve"]]
    values = [point[1] for point in row["curve"]]
    assert steps[-1] == 300 and steps == sorted(steps) and len(steps) >= 2
    assert all(math.isfinite(v) for v in values) and min(values[1:]) < values[0], row
    assert table([row]).count("\n") == 2
