"""Independent implementations agree with our engines on hyper-cleaning (float64):
implicit vs TorchOpt's custom_root, unrolled vs higher's innerloop_ctx, both vs central finite
differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from bilevel.compile import compile_spec
from bilevel.engines import build_engine
from bilevel.engines import ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.spec import spec_from_data

torchopt = pytest.importorskip("torchopt")
higher = pytest.importorskip("higher")

N_TRAIN, N_VAL, D, CLASSES, MU, LR, STEPS = 120, 80, 12, 4, 0.1, 0.5, 60
DATA = {"dataset": "mixture", "n_train": N_TRAIN, "n_val": N_VAL, "d": D, "classes": CLASSES, "seed": 3}


def _problem(steps: int = STEPS, warm_start: bool = False, solver: dict | None = None):
    data = {
        "levels": {
            "upper": {
                "variables": {"lam": {"shape": [N_TRAIN], "init": "normal", "init_scale": 0.5}},
                "objective": "problems.hyperclean:upper_objective",
                "data": {"source": "problems.hyperclean:val_data", "kwargs": DATA},
            },
            "lower": {
                "parent": "upper",
                "variables": {"W": {"shape": [CLASSES, D], "init": "normal", "init_scale": 0.1}, "b": {"shape": [CLASSES]}},
                "objective": "problems.hyperclean:lower_objective",
                "objective_kwargs": {"mu": MU},
                "data": {"source": "problems.hyperclean:train_data", "kwargs": DATA},
                "solver": {"name": "sgd", "lr": LR, "steps": steps, "warm_start": warm_start, **(solver or {})},
                "assumptions": {"convexity": "strongly_convex"},
            },
        },
        "run": {"dtype": "float64", "device": "cpu", "seed": 0},
    }
    problem = compile_spec(spec_from_data(data))
    return problem, problem.fresh(problem.upper.init)


def _arrays(problem):
    train, val = problem.lower.data.full, problem.upper.data.full
    return train["x"], train["y"], val["x"], val["y"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _lower_loss(lam, W, b, x, y):
    losses = nnf.cross_entropy(nnf.linear(x, W, b), y, reduction="none")
    return (torch.sigmoid(lam) * losses).mean() + 0.5 * MU * ((W**2).sum() + (b**2).sum())


def _ours(problem, x, config):
    engine = build_engine(config)
    return engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


def test_implicit_matches_torchopt_custom_root() -> None:
    problem, x = _problem(steps=400)
    ours = _ours(problem, x, ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=200, tol=0.0)))
    assert float(ours.stats.inner_residual) < 1e-9  # converged: the IFT hypergradient is exact
    xt, yt, xv, yv = _arrays(problem)
    W0, b0 = (p.clone() for p in problem.lower.init)

    def optimality(params, lam):
        W, b = params
        return torch.func.grad(lambda p: _lower_loss(lam, p[0], p[1], xt, yt))((W, b))

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=200, atol=0.0, rtol=1e-14))
    def solve(params, lam):
        W, b = (p.detach().clone().requires_grad_(True) for p in params)
        lam = lam.detach()
        with torch.enable_grad():
            for _ in range(400):
                gW, gb = torch.autograd.grad(_lower_loss(lam, W, b, xt, yt), (W, b))
                W, b = (W - LR * gW).detach().requires_grad_(True), (b - LR * gb).detach().requires_grad_(True)
        return W.detach(), b.detach()

    lam = x[0].detach().clone().requires_grad_(True)
    W, b = solve((W0, b0), lam)
    upper = nnf.cross_entropy(nnf.linear(xv, W, b), yv)
    (reference,) = torch.autograd.grad(upper, lam)
    assert _rel(ours.grad[0], reference) < 1e-5
    assert abs(float(ours.upper_loss) - upper.item()) < 1e-10


def _higher_hypergradient(problem, x, steps: int, make_optimizer) -> torch.Tensor:
    """d F(lam, w_T(lam)) / d lam through `steps` steps of a torch.optim optimizer, by higher."""
    xt, yt, xv, yv = _arrays(problem)
    model = torch.nn.Linear(D, CLASSES).double()
    with torch.no_grad():
        model.weight.copy_(problem.lower.init[0])
        model.bias.copy_(problem.lower.init[1])
    lam = x[0].detach().clone().requires_grad_(True)
    with higher.innerloop_ctx(model, make_optimizer(model.parameters()), copy_initial_weights=True) as (fmodel, opt):
        for _ in range(steps):
            losses = nnf.cross_entropy(fmodel(xt), yt, reduction="none")
            reg = 0.5 * MU * sum((p**2).sum() for p in fmodel.parameters())
            opt.step((torch.sigmoid(lam) * losses).mean() + reg)
        (reference,) = torch.autograd.grad(nnf.cross_entropy(fmodel(xv), yv), lam)
    return reference


def test_unrolled_matches_higher() -> None:
    problem, x = _problem(steps=STEPS)
    ours = _ours(problem, x, UnrolledConfig())
    reference = _higher_hypergradient(problem, x, STEPS, lambda params: torch.optim.SGD(params, lr=LR))
    assert _rel(ours.grad[0], reference) < 1e-5
    # checkpointed and truncated-to-everything variants are the same derivative
    assert _rel(_ours(problem, x, UnrolledConfig(checkpoint_every=7)).grad[0], reference) < 1e-10
    assert _rel(_ours(problem, x, UnrolledConfig(truncate=STEPS)).grad[0], reference) < 1e-10


PEER_OPTIMIZERS = {
    "momentum": ({"name": "momentum", "momentum": 0.7, "lr": 0.2},
                 lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.7)),
    # eps ~ 0: higher adds eps to sqrt(v) before the bias correction (the pre-1.6 torch.optim.Adam
    # form), ours after it as torch.optim.Adam does now; the two agree exactly only as eps -> 0
    "adam": ({"name": "adam", "lr": 0.05, "betas": [0.8, 0.95], "eps": 1e-30},
             lambda params: torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.95), eps=1e-30)),
}


@pytest.mark.parametrize("name", sorted(PEER_OPTIMIZERS))
def test_unrolled_through_stateful_optimizers_matches_higher(name: str) -> None:
    """Heavy ball and Adam carry state across inner steps: the derivative through that state, with
    every checkpointing and truncation that covers all steps, is higher's through torch.optim."""
    solver, make_optimizer = PEER_OPTIMIZERS[name]
    steps = 30
    problem, x = _problem(steps=steps, solver=solver)
    reference = _higher_hypergradient(problem, x, steps, make_optimizer)
    for config in (UnrolledConfig(), UnrolledConfig(checkpoint_every=7), UnrolledConfig(checkpoint_every=1),
                   UnrolledConfig(truncate=steps, checkpoint_every=10)):
        assert _rel(_ours(problem, x, config).grad[0], reference) < 1e-8, config


def _upper_after_solve(problem, lam: torch.Tensor, steps: int) -> float:
    """F(lam, y_T(lam)) by running the inner GD from the initial point, no autograd."""
    xt, yt, xv, yv = _arrays(problem)
    W, b = (p.clone().requires_grad_(True) for p in problem.lower.init)
    for _ in range(steps):
        gW, gb = torch.autograd.grad(_lower_loss(lam, W, b, xt, yt), (W, b))
        W, b = (W - LR * gW).detach().requires_grad_(True), (b - LR * gb).detach().requires_grad_(True)
    return float(nnf.cross_entropy(nnf.linear(xv, W.detach(), b.detach()), yv))


@pytest.mark.parametrize("kind", ["implicit", "unrolled"])
def test_engines_match_central_finite_differences(kind: str) -> None:
    steps = 400 if kind == "implicit" else 40
    problem, x = _problem(steps=steps)
    config = ImplicitConfig(linear_solver=LinearSolverSpec(maxiter=200, tol=0.0)) if kind == "implicit" else UnrolledConfig()
    grad = _ours(problem, x, config).grad[0]
    gen = torch.Generator().manual_seed(1)
    eps = 1e-5
    for _ in range(3):
        direction = torch.randn(N_TRAIN, generator=gen, dtype=torch.float64)
        direction /= direction.norm()
        lam = x[0].detach()
        fd = (_upper_after_solve(problem, lam + eps * direction, steps) - _upper_after_solve(problem, lam - eps * direction, steps)) / (2 * eps)
        directional = float(grad @ direction)
        assert abs(directional - fd) <= 1e-5 * max(abs(fd), grad.norm().item() * 1e-2)
