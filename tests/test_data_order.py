"""data.order: which minibatch each use of a level's data gets. shuffled (the default): the next
minibatch at every draw, a fresh batch at each inner step; per_outer_step: one batch per outer
step for every inner step; paired: at outer step k the lower level takes the examples of the top
level's batch k. Checked on the batches themselves, against a hand-written unrolled loop over the
same batch (the structure of TorchOpt's and higher's tests), through a run, and for its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bilevel
from bilevel.compile import compile_spec
from bilevel.data import begin_outer_step
from bilevel.engines import UnrolledConfig, build_engine
from bilevel.spec import SpecError, spec_from_data
from problems.toy import ridge_spec

LR, STEPS, BATCH = 0.2, 4, 8


def _problem(order: str, same_source: bool = True, upper_batch: int | None = BATCH, **lower_data):
    data = ridge_spec(inner_steps=STEPS, inner_lr=LR).model_dump(mode="json")
    if same_source:
        data["levels"]["lower"]["data"]["source"] = "problems.toy:ridge_val_data"
    data["levels"]["lower"]["data"].update(batch_size=BATCH, order=order, **lower_data)
    data["levels"]["upper"]["data"]["batch_size"] = upper_batch
    data["levels"]["lower"]["solver"]["warm_start"] = False
    return compile_spec(spec_from_data(data))


def _draws(problem, steps: int = 2, inner: int = 3):
    out = []
    for _ in range(steps):
        begin_outer_step(level.data for level in problem.chain)
        upper = problem.upper.batch()
        out.append((upper, [problem.lower.batch() for _ in range(inner)]))
    return out


def test_shuffled_draws_a_fresh_batch_at_every_inner_step() -> None:
    for upper, lowers in _draws(_problem("shuffled")):
        assert not torch.equal(lowers[0]["X"], lowers[1]["X"]) and not torch.equal(lowers[1]["X"], lowers[2]["X"])


def test_per_outer_step_holds_one_batch_for_the_step() -> None:
    (_, first), (_, second) = _draws(_problem("per_outer_step"))
    assert all(torch.equal(first[0]["X"], b["X"]) for b in first[1:])
    assert not torch.equal(first[0]["X"], second[0]["X"])


def test_paired_gives_the_lower_level_the_top_levels_batch() -> None:
    for upper, lowers in _draws(_problem("paired")):
        assert all(torch.equal(upper["X"], b["X"]) and torch.equal(upper["t"], b["t"]) for b in lowers)
    # different sources of the same size: the same example indices
    problem = _problem("paired", same_source=False)
    begin_outer_step(level.data for level in problem.chain)
    upper, lower = problem.upper.batch(), problem.lower.batch()
    index = problem.upper.data.index
    assert torch.equal(lower["X"], problem.lower.data.full["X"].index_select(0, index))
    assert not torch.equal(upper["X"], lower["X"])


def test_paired_unrolled_hypergradient_is_the_loop_over_batch_k() -> None:
    """At outer step k: STEPS steps of GD on batch k, then F on batch k, differentiated in lam."""
    problem = _problem("paired")
    engine = build_engine(UnrolledConfig())
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    for _ in range(2):
        begin_outer_step(level.data for level in problem.chain)
        batch = problem.upper.batch()
        ours = engine.hypergrad(problem, x, state, batch)
        lam = x[0].detach().clone().requires_grad_(True)
        w = problem.lower.init[0].clone().requires_grad_(True)
        X, t = batch["X"], batch["t"]
        for _ in range(STEPS):
            loss = 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (torch.exp(lam) * w**2).sum()
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            w = w - LR * g
        (reference,) = torch.autograd.grad(0.5 * ((X @ w - t) ** 2).mean(), lam)
        assert float((ours.grad[0] - reference).norm() / reference.norm()) < 1e-12


def test_a_paired_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    spec = ridge_spec(inner_steps=STEPS, inner_lr=LR, steps=6, checkpoint_every=3).model_dump(mode="json")
    spec["levels"]["lower"]["data"].update(source="problems.toy:ridge_val_data", batch_size=BATCH, order="paired")
    spec["levels"]["upper"]["data"]["batch_size"] = BATCH
    whole = bilevel.run(spec_from_data(spec), engine="unrolled", out=tmp_path / "a", progress=False)
    spec["run"]["steps"] = 3
    bilevel.run(spec_from_data(spec), engine="unrolled", out=tmp_path / "b", progress=False)
    spec["run"]["steps"] = 6
    resumed = bilevel.run(spec_from_data(spec), engine="unrolled", out=tmp_path / "b", progress=False, resume=True)
    assert torch.equal(whole.x[0], resumed.x[0])


@pytest.mark.parametrize("where, change, message", [
    ("upper", {"order": "paired"}, "the top level itself draws one batch per outer step"),
    ("lower", {"kwargs": {"n": 30}}, "same number of examples"),
])
def test_paired_errors(where: str, change: dict, message: str) -> None:
    data = ridge_spec().model_dump(mode="json")
    data["levels"]["lower"]["data"]["order"] = "paired"
    data["levels"][where]["data"].update(change)
    with pytest.raises(SpecError) as info:
        compile_spec(spec_from_data(data))
    assert any(issue.path.endswith("data.order") and message in issue.message for issue in info.value.issues), info.value.issues
