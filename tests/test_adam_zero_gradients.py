"""Unrolled Adam where inner gradient entries are exactly zero (a dead ReLU unit, an unused
parameter): the derivative of sqrt(v) at v = 0 is taken as 0 (exact there, since v = 0 only where
every gradient so far was zero). Checked in float64 against higher through torch.optim.Adam (which
masks the same entries), against TorchOpt's differentiable Adam with eps_root, and against central
finite differences of the T-step run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bilevel.compile import compile_spec
from bilevel.engines import UnrolledConfig, build_engine
from bilevel.spec import spec_from_data

higher = pytest.importorskip("higher")
torchopt = pytest.importorskip("torchopt")

MODULE = str((Path(__file__).parent / "runtime_data" / "dead_relu.py").resolve())
STEPS, LR, BETAS = 25, 0.05, (0.8, 0.95)
NAMES = ("w1", "b1", "w2", "b2", "unused")


def _problem(**solver):
    ref = lambda attr: f"{MODULE}:{attr}"  # noqa: E731
    data = {
        "levels": {
            "upper": {
                "variables": {"lam": {"shape": [24], "init": "normal", "init_scale": 0.5}},
                "objective": ref("upper"),
                "data": {"source": ref("val_data")},
            },
            "lower": {
                "parent": "upper",
                "variables": {"w1": {"shape": [4, 3], "init": ref("init_w1")}, "b1": {"shape": [4], "init": ref("init_b1")},
                              "w2": {"shape": [1, 4], "init": ref("init_w2")}, "b2": {"shape": [1]},
                              "unused": {"shape": [3], "init": 0.3}},
                "objective": ref("lower"),
                "data": {"source": ref("train_data")},
                "solver": {"name": "adam", "lr": LR, "betas": list(BETAS), "steps": STEPS, "warm_start": False, **solver},
            },
        },
        "run": {"dtype": "float64", "device": "cpu", "seed": 0},
    }
    problem = compile_spec(spec_from_data(data))
    return problem, problem.fresh(problem.upper.init)


def _ours(problem, x, config=None):
    engine = build_engine(config or UnrolledConfig())
    return engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


def _arrays(problem):
    train, val = problem.lower.data.full, problem.upper.data.full
    return train["x"], train["t"], val["x"], val["t"]


class _Net(torch.nn.Module):
    def __init__(self, init):
        super().__init__()
        for name, value in zip(NAMES, init):
            setattr(self, name, torch.nn.Parameter(value.clone()))

    def forward(self, x):
        return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def _lower_loss(lam, out, t):
    return (torch.sigmoid(lam) * ((out - t) ** 2).squeeze(1)).mean()


def _higher_hypergradient(problem, x, eps: float) -> torch.Tensor:
    xt, tt, xv, tv = _arrays(problem)
    net = _Net(problem.lower.init)
    lam = x[0].detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR, betas=BETAS, eps=eps)
    with higher.innerloop_ctx(net, optimizer, copy_initial_weights=True) as (fnet, diffopt):
        for _ in range(STEPS):
            diffopt.step(_lower_loss(lam, fnet(xt), tt))
        (grad,) = torch.autograd.grad(((fnet(xv) - tv) ** 2).mean(), lam)
    return grad


def _has_exact_zero_gradients(problem, x) -> bool:
    xt, tt, _, _ = _arrays(problem)
    params = [p.clone().requires_grad_(True) for p in problem.lower.init]
    net = _Net(params)
    loss = _lower_loss(x[0], net(xt), tt)
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    return grads[4] is None and bool((grads[0][0] == 0).all() and grads[1][0] == 0 and grads[2][0, 0] == 0)


def test_the_problem_has_exactly_zero_gradient_entries() -> None:
    problem, x = _problem()
    assert _has_exact_zero_gradients(problem, x)


def test_unrolled_adam_is_finite_and_matches_higher_at_zero_gradients() -> None:
    """higher through torch.optim.Adam adds eps to sqrt(v) before the bias correction, ours after
    it (the torch.optim.Adam form since torch 1.6): they agree exactly only as eps -> 0."""
    problem, x = _problem(eps=1e-30)
    ours = _ours(problem, x).grad[0]
    reference = _higher_hypergradient(problem, x, eps=1e-30)
    assert torch.isfinite(ours).all()
    assert torch.isfinite(reference).all()
    assert float((ours - reference).norm() / reference.norm()) < 1e-10
    for config in (UnrolledConfig(checkpoint_every=6), UnrolledConfig(truncate=STEPS, checkpoint_every=1)):
        assert float((_ours(problem, x, config).grad[0] - reference).norm() / reference.norm()) < 1e-10, config


def _upper_after_adam(problem, lam: torch.Tensor, eps: float) -> float:
    """F(lam, y_T(lam)) through torch.optim.Adam itself, no graph."""
    xt, tt, xv, tv = _arrays(problem)
    net = _Net(problem.lower.init)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR, betas=BETAS, eps=eps)
    for _ in range(STEPS):
        optimizer.zero_grad()
        _lower_loss(lam, net(xt), tt).backward()
        optimizer.step()
    with torch.no_grad():
        return float(((net(xv) - tv) ** 2).mean())


def test_unrolled_adam_at_zero_gradients_matches_finite_differences() -> None:
    problem, x = _problem()  # default eps 1e-8: torch.optim.Adam's formula, which is ours
    grad = _ours(problem, x).grad[0]
    assert torch.isfinite(grad).all()
    gen = torch.Generator().manual_seed(3)
    h = 1e-6
    for _ in range(3):
        direction = torch.randn(grad.shape, generator=gen, dtype=torch.float64)
        direction /= direction.norm()
        lam = x[0].detach()
        fd = (_upper_after_adam(problem, lam + h * direction, 1e-8) - _upper_after_adam(problem, lam - h * direction, 1e-8)) / (2 * h)
        assert abs(float(grad @ direction) - fd) <= 1e-7 * max(abs(fd), float(grad.norm()))


def test_eps_root_matches_torchopt() -> None:
    """eps_root > 0: the update lr m_hat / (sqrt(v_hat + eps_root) + eps) of TorchOpt's adam."""
    eps_root = 1e-12
    problem, x = _problem(eps_root=eps_root)
    ours = _ours(problem, x).grad[0]
    xt, tt, xv, tv = _arrays(problem)
    lam = x[0].detach().clone().requires_grad_(True)
    params = tuple(p.clone().requires_grad_(True) for p in problem.lower.init)
    optimizer = torchopt.adam(lr=LR, betas=BETAS, eps=1e-8, eps_root=eps_root, moment_requires_grad=True)
    state = optimizer.init(params)

    def predict(p, inputs):
        return torch.relu(inputs @ p[0].T + p[1]) @ p[2].T + p[3]

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # TorchOpt's bias correction 1 - b^count (count an int tensor) is in the default dtype
    try:
        for _ in range(STEPS):
            grads = torch.autograd.grad(_lower_loss(lam, predict(params, xt), tt), params, create_graph=True, allow_unused=True)
            grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
            updates, state = optimizer.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
    finally:
        torch.set_default_dtype(default)
    (reference,) = torch.autograd.grad(((predict(params, xv) - tv) ** 2).mean(), lam)
    assert torch.isfinite(ours).all()
    assert float((ours - reference).norm() / reference.norm()) < 1e-10
