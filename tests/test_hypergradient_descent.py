"""Hypergradient descent (Baydin et al. 2018) as an inner and an outer optimizer option
(``solver.lr_hypergradient``), against a direct transcription of the paper's updates, and the
spec errors of the option and of tuned schedules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bilevel import run
from bilevel.cli import app
from bilevel.optim import InnerOptimizer
from bilevel.runtime.outer import HypergradientDescent, build_outer_optimizer
from bilevel.spec import OptimizerSpec, spec_from_data
from problems.toy import quadratic_spec

BETA, LR, STEPS = 1e-3, 0.01, 30


def _objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A small ill-conditioned quadratic in two tensors."""
    scales = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    return 0.5 * (scales * (w - 1.0) ** 2).sum() + 0.5 * ((b + 2.0) ** 2).sum()


def _grads(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
    return torch.autograd.grad(_objective(w, b), (w, b))


def _reference(adam: bool) -> tuple[list[torch.Tensor], list[float]]:
    """The paper's algorithms 1 (SGD-HD) and 2 (Adam-HD) written out, all parameters together."""
    params = [torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    lr, previous = LR, [torch.zeros_like(p) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    rates = []
    for t in range(1, STEPS + 1):
        g = _grads(*params)
        lr = lr + BETA * sum(float((a * c).sum()) for a, c in zip(g, previous))
        if adam:
            m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
            v = [0.999 * vi + 0.001 * gi * gi for vi, gi in zip(v, g)]
            u = [(mi / (1 - 0.9**t)) / ((vi / (1 - 0.999**t)).sqrt() + 1e-8) for mi, vi in zip(m, v)]
        else:
            u = list(g)
        params = [p - lr * ui for p, ui in zip(params, u)]
        previous = u
        rates.append(lr)
    return params, rates


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_the_inner_optimizer_follows_the_papers_updates(name: str) -> None:
    optimizer = InnerOptimizer(OptimizerSpec(name=name, lr=LR, lr_hypergradient=BETA))
    params = (torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    state = optimizer.init(params)
    for _ in range(STEPS):
        params, state = optimizer.step(params, _grads(*params), state)
    expected, rates = _reference(adam=name == "adam")
    for got, want in zip(params, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    adapted = state[(0 if name == "sgd" else 2 * 2 + 1)]
    assert float(adapted) == pytest.approx(rates[-1], rel=1e-12) and rates[-1] > 2 * LR  # it learned to step faster


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_the_outer_optimizer_follows_the_papers_updates(name: str) -> None:
    params = (torch.zeros(3, dtype=torch.float64, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True))
    optimizer = build_outer_optimizer(OptimizerSpec(name=name, lr=LR, lr_hypergradient=BETA), params)
    assert isinstance(optimizer, HypergradientDescent)
    for _ in range(STEPS):
        for p, g in zip(params, _grads(*params)):
            p.grad = g
        optimizer.step()
    expected, rates = _reference(adam=name == "adam")
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-13)
    assert float(optimizer.adapted_lr()) == pytest.approx(rates[-1], rel=1e-12)
    restored = build_outer_optimizer(OptimizerSpec(name=name, lr=LR, lr_hypergradient=BETA), params)
    restored.load_state_dict(optimizer.state_dict())  # the adapted lr is checkpointed with the optimizer
    assert float(restored.adapted_lr()) == float(optimizer.adapted_lr())


def test_a_run_with_an_adapting_outer_lr(tmp_path: Path) -> None:
    """On the quadratic, an outer lr started 20x too small adapts: after 60 steps the upper loss
    is below that of the same run with the lr fixed."""
    losses = {}
    for beta in (None, 1e-3):
        data = quadratic_spec(inner_steps=30, steps=60, checkpoint_every=None).model_dump(mode="json")
        data["levels"]["upper"]["solver"] = {"name": "sgd", "lr": 0.01, "lr_hypergradient": beta}
        losses[beta] = run(spec_from_data(data), engine="implicit", out=tmp_path / str(beta), progress=False).result["final_upper_loss"]
    assert losses[1e-3] < 0.6 * losses[None]  # measured: 2.34 against 4.85


# --- spec errors -------------------------------------------------------------------------------------
def _tuned_data() -> dict[str, Any]:
    data = quadratic_spec(inner_steps=10).model_dump(mode="json")
    data["levels"]["upper"]["variables"]["inner_lr"] = {"shape": [4], "init": 0.05}
    data["levels"]["lower"]["solver"].update({"tuned": {"lr": "inner_lr"}, "tuned_schedule": {"hyperparameters": ["lr"]}})
    return data


def _plan_error(tmp_path: Path, data: dict[str, Any], command: str = "plan") -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "spec.yaml" in result.output
    return result.output


def _solver(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(_tuned_data())
    data["levels"]["lower"]["solver"].update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (_solver(name="momentum", tuned={}, tuned_schedule=None, lr_hypergradient=0.01),
         "levels.lower.solver.lr_hypergradient", "defined for sgd and adam"),
        (_solver(lr_hypergradient=0.01, tuned_schedule=None), "levels.lower.solver.lr_hypergradient", "tuned by an upper variable"),
        (_solver(tuned={}), "levels.lower.solver.tuned_schedule", "must be tuned by an upper variable"),
        (_solver(lr_hypergradient=-1.0, tuned={}, tuned_schedule=None), "levels.lower.solver.lr_hypergradient", "greater than 0"),
        (_solver(tuned_schedule={"hyperparameters": ["lr"], "horizon": 0}), "levels.lower.solver.tuned_schedule.horizon", ""),
    ],
    ids=["momentum", "tuned lr", "untuned schedule", "negative beta", "zero horizon"],
)
def test_bad_options_exit_2_with_the_dotted_path(data: dict[str, Any], path: str, message: str, tmp_path: Path) -> None:
    output = _plan_error(tmp_path, data, "validate")
    assert path in output and message in output, output


def test_an_outer_schedule_with_an_adapting_lr_is_refused(tmp_path: Path) -> None:
    data = _tuned_data()
    data["levels"]["upper"]["solver"] = {"name": "adam", "lr": 0.01, "lr_hypergradient": 1e-4, "schedule": "cosine"}
    output = _plan_error(tmp_path, data, "validate")
    assert "levels.upper.solver.lr_hypergradient" in output and "drop schedule: cosine" in output


def test_a_schedule_must_be_a_vector(tmp_path: Path) -> None:
    data = _tuned_data()
    data["levels"]["upper"]["variables"]["inner_lr"]["shape"] = [2, 2]
    output = _plan_error(tmp_path, data)
    assert "levels.lower.solver.tuned.lr" in output and "a vector of shape [K]" in output
    unscheduled = _tuned_data()
    unscheduled["levels"]["lower"]["solver"]["tuned_schedule"] = None
    output = _plan_error(tmp_path, unscheduled)
    assert "must be a scalar" in output and "or a vector read as a schedule (solver.tuned_schedule)" in output
