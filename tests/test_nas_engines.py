"""DARTS and RARTS: the analytic toy behaves as theory says, the finite-difference architecture
gradient agrees with the exact one and with autograd through the virtual step, the power
iteration finds the dominant eigenvalue, and the collapse guards act, on constructed weights and
on a supernet search that collapses to skip connections."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import bilevel
from bilevel import build_engine, compile_spec
from bilevel.engines.architecture import grad_x
from bilevel.engines.darts import virtual_step
from bilevel.linalg import Linearization, joint_grad, power_iteration
from bilevel.nas.genotype import Genotype, derive_genotype
from bilevel.nas.supernet import Architecture
from bilevel.engines import DartsConfig, RartsConfig
from bilevel.spec import ArchitectureVariable, CellSpec, ConvSearchSpace, spec_from_data
from problems.nas.toy import darts_fixed_point, rarts_fixed_point, toy_spec


# --- the analytic toy -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "xi"),
    [
        (DartsConfig(order=1), 0.1),
        (DartsConfig(order=2), 0.1),
        (DartsConfig(order=2), 0.5),
        (DartsConfig(order=2, hessian="exact"), 0.25),
    ],
    ids=["first-order", "second-order-fd-xi0.1", "second-order-fd-xi0.5", "second-order-exact-xi0.25"],
)
def test_darts_on_the_analytic_toy(config: DartsConfig, xi: float, tmp_path: Path) -> None:
    """First order ends at (2, 2); second order at alpha = 2 / (1 + 2 xi) (exact at xi = 1/2)."""
    result = bilevel.run(toy_spec(steps=800, inner_lr=xi, outer_lr=0.2), engine=config, out=tmp_path, progress=False)
    alpha, w = darts_fixed_point(config.order, xi)
    assert float(result.x[0]) == pytest.approx(alpha, abs=1e-8)
    assert float(result.y[0]) == pytest.approx(w, abs=1e-8)


def _drive(config, spec, steps: int):
    """The engine and an SGD step on alpha, keeping the engine state (RARTS's second copy y)."""
    problem = compile_spec(spec)
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    state = engine.init(problem, x)
    lr = spec.levels["upper"].solver.lr
    for _ in range(steps):
        out = engine.hypergrad(problem, x, state, problem.upper.batch())
        x, state = tuple(p - lr * g for p, g in zip(x, out.grad)), out.state
    return x, state


def _rarts_sweep_on_the_toy(lam: float, beta: float, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One RARTS outer step on the toy, written out from the update rules (docs/engines/darts.md)
    with plain gradient steps of size lr for w, y and alpha, as the affine map z -> M z + c of
    z = (alpha, w, y) (L_train = (w - alpha)^2, L_val = alpha y - 2 alpha + 1):

        w     <- w - lr (2 lam (w - alpha) + beta (w - y))
        y     <- y - lr (alpha + beta (y - w))                    (w updated)
        alpha <- alpha - lr ((y - 2) - 2 lam (w - alpha))         (w, y updated)

    M and c are read off by applying the sweep to 0 and to the unit vectors (float64)."""

    def sweep(z: torch.Tensor) -> torch.Tensor:
        alpha, w, y = z.tolist()
        w = w - lr * (2 * lam * (w - alpha) + beta * (w - y))
        y = y - lr * (alpha + beta * (y - w))
        alpha = alpha - lr * ((y - 2) - 2 * lam * (w - alpha))
        return torch.tensor([alpha, w, y], dtype=torch.float64)

    c = sweep(torch.zeros(3, dtype=torch.float64))
    M = torch.stack([sweep(e) - c for e in torch.eye(3, dtype=torch.float64)], dim=1)
    return M, c


@pytest.mark.parametrize(("lam", "beta", "lr", "steps"), [(1.0, 1.0, 0.5, 200), (10.0, 10.0, 0.08, 200), (100.0, 100.0, 0.009, 600)])
def test_rarts_on_the_analytic_toy(lam: float, beta: float, lr: float, steps: int) -> None:
    """The engine's steps are the Gauss-Seidel sweep written out independently below, and RARTS
    comes to rest, to 1e-8, at that iteration's fixed point, found independently of the engine and
    of the closed form: the solution of (I - M) z = c for the sweep's affine map, which contracts
    (spectral radius < 1) at these step sizes. The closed form
    of problems/nas/toy.py (alpha = 2 / (2 - 1/beta - 1/(2 lam)), w = alpha (1 - 1/(2 lam)),
    y = 2 - alpha) is that point, and it approaches the bilevel optimum (1, 1) as lam and beta grow."""
    M, c = _rarts_sweep_on_the_toy(lam, beta, lr)
    radius = float(torch.linalg.eigvals(M).abs().max())
    assert radius < 1 and radius**steps < 1e-12  # enough steps for the contraction to reach 1e-8
    alpha, w, y = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - M, c).tolist()
    assert rarts_fixed_point(lam, beta) == pytest.approx((alpha, w, y), abs=1e-12)

    config, spec = RartsConfig(lam=lam, beta=beta), toy_spec(inner_lr=lr, outer_lr=lr)
    z = torch.zeros(3, dtype=torch.float64)  # the toy starts at alpha = w = 0, and y = w
    for _ in range(3):
        z = M @ z + c
    x, state = _drive(config, spec, 3)  # the engine's first sweeps are the map's (Gauss-Seidel order included)
    assert [float(x[0]), float(state.lower[0]), float(state.y[0])] == pytest.approx(z.tolist(), abs=1e-12)

    x, state = _drive(config, spec, steps)
    assert float(x[0]) == pytest.approx(alpha, abs=1e-8)
    assert float(state.lower[0]) == pytest.approx(w, abs=1e-8)
    assert float(state.y[0]) == pytest.approx(y, abs=1e-8)
    bias = 1.0 / beta + 1.0 / (2 * lam)  # the documented bias alpha - 1 = s / (2 - s), s = 1/beta + 1/(2 lam)
    assert alpha - 1.0 == pytest.approx(bias / (2 - bias), abs=1e-12)
    if lam >= 100:
        assert abs(float(x[0]) - 1.0) < 0.01 and abs(float(state.lower[0]) - 1.0) < 0.01


# --- tiny supernets in float64 --------------------------------------------------------------------
def _tiny_spec(kind: str) -> dict:
    flat = kind == "mlp"
    if flat:  # smooth operations: finite differences converge like O(eps^2)
        space = {"kind": "mlp", "ops": ["none", "skip_connect", "linear_tanh", "tanh"], "cell": {"nodes": 2}, "cells": 1,
                 "width": 8, "in_features": 64, "classes": 10}
    else:  # ReLU convolutions: piecewise smooth
        space = {"kind": "conv", "ops": ["none", "skip_connect", "avg_pool_3x3", "sep_conv_3x3"], "cell": {"nodes": 2},
                 "cells": 2, "reductions": [1], "channels": 4, "stem_multiplier": 1, "in_channels": 1, "classes": 10}
    kwargs = {"n_train": 300, "n_val": 300, "flat": flat}
    return {
        "name": "tiny-nas",
        "levels": {
            "upper": {"variables": {"arch": {"kind": "architecture", "space": space, "init_scale": 0.5}},
                      "objective": "bilevel.nas:supernet_loss",
                      "data": {"source": "problems.nas:digits_data", "kwargs": {**kwargs, "part": "val"}, "batch_size": 16},
                      "solver": {"name": "adam", "lr": 0.01}},
            "lower": {"parent": "upper", "variables": {"net": {"kind": "supernet", "architecture": "arch"}},
                      "objective": "bilevel.nas:supernet_loss",
                      "data": {"source": "problems.nas:digits_data", "kwargs": {**kwargs, "part": "train"}, "batch_size": 16},
                      "solver": {"name": "momentum", "lr": 0.1, "momentum": 0.9, "steps": 2, "weight_decay": 3e-4}},
        },
        "run": {"device": "cpu", "dtype": "float64", "seed": 3},
    }


def _setup(kind: str):
    """A compiled tiny problem after one first-order DARTS step: trained weights, a momentum buffer."""
    problem = compile_spec(spec_from_data(_tiny_spec(kind)))
    x = problem.fresh(problem.upper.init)
    engine = build_engine(DartsConfig(order=1))
    state = engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch()).state
    return problem, x, state


def _flat(parts) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


@pytest.mark.parametrize(("kind", "radius", "tolerance"), [("mlp", 0.01, 1e-4), ("conv", 1e-6, 1e-6)])
def test_finite_difference_architecture_gradient_matches_the_exact_one(kind: str, radius: float, tolerance: float) -> None:
    """Second-order DARTS: the central-difference mixed product agrees with the exact mixed VJP, and
    the exact gradient equals autograd through the virtual step d/dalpha L_val(w'(alpha), alpha)
    (float64). With ReLU operations the gradient is only piecewise smooth: the difference agrees
    once the perturbation crosses no activation kink (a small radius)."""
    problem, x, state = _setup(kind)
    val_batch, train_batch = problem.upper.batch(), problem.lower.batch()
    grads = {}
    for hessian in ("finite_difference", "exact"):
        engine = build_engine(DartsConfig(order=2, hessian=hessian, fd_radius=radius))
        xi = engine.xi(problem, x)
        moved, _ = virtual_step(problem, x, state.lower, state.inner_state, train_batch, xi)
        f_x, f_w, _ = joint_grad(lambda xx, ww: problem.upper_objective(xx, ww, val_batch), x, moved)
        mixed = engine._mixed_product(problem, x, state.lower, f_w, train_batch)
        grads[hessian] = _flat(fx - xi * m for fx, m in zip(f_x, mixed))

    # independent: autograd through w'(alpha) = w - xi (mu m + grad_w L_train(w, alpha))
    alpha = tuple(p.detach().requires_grad_(True) for p in x)
    w = tuple(p.detach().requires_grad_(True) for p in state.lower)
    g = torch.autograd.grad(problem.lower_objective(alpha, w, train_batch), w, create_graph=True)
    mu = problem.lower.solver.momentum
    moved = tuple(p - xi * (mu * m + gi) for p, m, gi in zip(w, state.inner_state, g))
    reference = _flat(torch.autograd.grad(problem.upper_objective(alpha, moved, val_batch), alpha))

    scale = reference.norm()
    assert float((grads["exact"] - reference).norm() / scale) < 1e-10
    assert float((grads["finite_difference"] - grads["exact"]).norm() / scale) < tolerance
    first_order, _ = grad_x(lambda xx: problem.upper_objective(xx, state.lower, val_batch), x)
    assert float((_flat(first_order) - reference).norm() / scale) > 1e-3  # the second-order term matters


def test_power_iteration_finds_the_dominant_eigenvalue_of_the_architecture_hessian() -> None:
    problem, x, state = _setup("mlp")
    batch = problem.upper.batch()
    shapes = [p.shape for p in x]

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for shape in shapes:
            n = int(torch.Size(shape).numel())
            parts.append(v[start : start + n].reshape(shape))
            start += n
        return problem.upper_objective(tuple(parts), state.lower, batch)

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, _flat(x)))
    dominant = eigenvalues[eigenvalues.abs().argmax()]
    lin = Linearization(lambda ww, aa: problem.upper_objective(aa, ww, batch), state.lower, x)
    estimate, _ = power_iteration(lin.hvp, tuple(torch.randn_like(p) for p in x), 200)
    assert float(estimate) == pytest.approx(float(dominant), rel=1e-4)


# --- collapse guards ------------------------------------------------------------------------------
def _growing_curvature_spec(tmp_path: Path, config: dict) -> dict:
    """L_val = 1/2 w^2 (alpha - 1)^2 whose curvature in alpha, w^2, grows as the lower level
    L_train = (w - 3)^2 trains w from 0.5 towards 3: the sharpening DARTS-ES watches for."""
    module = tmp_path / "sharpening.py"
    module.write_text(
        "def val_loss(upper, lower, batch):\n    return 0.5 * lower['w'] ** 2 * ((upper['alpha'] - 1) ** 2).sum()\n"
        "def train_loss(upper, lower, batch):\n    return (lower['w'] - 3) ** 2 + 0.0 * upper['alpha'].sum()\n"
    )
    return {
        "name": "sharpening",
        "levels": {
            "upper": {"variables": {"alpha": {"shape": [3], "init": 0.0}}, "objective": f"{module}:val_loss",
                      "solver": {"name": "sgd", "lr": 0.01}},
            "lower": {"parent": "upper", "variables": {"w": {"shape": [], "init": 0.5}}, "objective": f"{module}:train_loss",
                      "solver": {"name": "sgd", "lr": 0.02, "steps": 1}},
        },
        "engine": {"kind": "darts", "order": 1, **config},
        "run": {"device": "cpu", "dtype": "float64", "steps": 200, "checkpoint_every": None, "out": str(tmp_path / "run")},
    }


def test_eigenvalue_early_stop_restores_the_earlier_architecture(tmp_path: Path) -> None:
    config = {"eigen_every": 5, "eigen_iters": 5, "early_stop_ratio": 0.75, "eigen_window": 2, "eigen_lookback": 3}
    trace: dict[int, torch.Tensor] = {}
    result = bilevel.run(spec_from_data(_growing_curvature_spec(tmp_path, config)), progress=False,
                         on_step=lambda step, x, y: trace.__setitem__(step, x[0].clone()))
    assert result.result["status"] == "stopped_early"
    assert "DARTS-ES" in result.result["stop_reason"]
    stopped = result.result["steps"]
    assert stopped < 200 and stopped % 5 == 4  # at an estimate step (the hypergradient call after step 5k - 1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "eigenvalue" in r]
    assert logged
    for record in logged:  # the Hessian in alpha is w^2 I: power iteration is exact; w is the lower value then
        assert record["eigenvalue"] > 0
    values = [r["eigenvalue"] for r in logged]
    assert values == sorted(values)  # the curvature grew
    # the run ends with the architecture of 3 estimates (15 steps) before the stopping estimate
    assert torch.allclose(result.x[0], trace[stopped - 15])


def test_eigenvalue_estimate_is_exact_when_the_hessian_is_a_multiple_of_the_identity(tmp_path: Path) -> None:
    config = {"eigen_every": 1, "eigen_iters": 3}
    spec = _growing_curvature_spec(tmp_path, config)
    spec["run"]["steps"] = 4
    problem = compile_spec(spec_from_data(spec))
    engine = build_engine(spec_from_data(spec).spec.engine)
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    for _ in range(3):
        out = engine.hypergrad(problem, x, state, None)
        w = float(out.state.lower[0])
        assert float(out.stats.extra["eigenvalue"]) == pytest.approx(w * w, rel=1e-12)
        state = out.state


def test_skip_collapse_is_limited_by_the_guard() -> None:
    """The failure mode, constructed: architecture weights in which skip connections dominate every
    edge of the normal cell (where long DARTS searches end). Without the guard the derived normal
    cell is all skips; with max_skip = 2 the two strongest skips stay and every other kept edge
    takes its best operation other than none and skip."""
    space = ConvSearchSpace(ops=["none", "skip_connect", "avg_pool_3x3", "sep_conv_3x3", "dil_conv_3x3"],
                            cell=CellSpec(nodes=3), cells=3, channels=8, in_channels=1, max_skip=2)
    architecture = Architecture(ArchitectureVariable(space=space))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for cell_type in ("normal", "reduce"):
            logits = getattr(architecture, cell_type)
            logits.copy_(torch.rand(logits.shape, generator=generator))
            logits[:, 1] += 3.0 + torch.rand(logits.shape[0], generator=generator)  # skip wins everywhere
    weights = architecture()
    collapsed = derive_genotype(weights, space, max_skip=None)
    assert collapsed.skip_count("normal") == 6 == len(collapsed.cells["normal"])

    guarded = derive_genotype(weights, space)  # the space's max_skip = 2
    assert guarded.skip_count("normal") == 2
    assert guarded.edges("normal") == collapsed.edges("normal")  # the same edges, other operations
    w = weights["normal"].detach()
    row = {edge: index for index, edge in enumerate(weights.edges)}
    kept = [row[(s, d)] for op, s, d in guarded.cells["normal"] if op == "skip_connect"]
    replaced = [(row[(s, d)], op) for op, s, d in guarded.cells["normal"] if op != "skip_connect"]
    assert min(float(w[i, 1]) for i in kept) >= max(float(w[i, 1]) for i, _ in replaced)  # the strongest skips stay
    for index, op in replaced:  # each replaced edge takes its best parametric or pooling operation
        others = {name: float(w[index, j]) for j, name in enumerate(space.ops) if name not in ("none", "skip_connect")}
        assert op == max(others, key=others.get)
    assert guarded.cells["reduce"] == collapsed.cells["reduce"]  # P-DARTS limits the normal cell only


# --- collapse on a real search ----------------------------------------------------------------------
IDENTITY_TASK = '''
import torch

def data(part="train", n=256, d=8):
    """Gaussian inputs whose regression target is the input itself."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0 if part == "train" else 1))
    return {"x": x, "t": x.clone()}

def loss(upper, lower, batch):
    return ((lower["net"](batch["x"], upper["arch"]()) - batch["t"]) ** 2).mean()
'''


def _identity_search(tmp_path: Path, steps: int, max_skip: int | None = None, engine: dict | None = None) -> dict:
    """A supernet search on a task the identity solves: MLP cells (width 8, 3 nodes, 6 kept edges)
    regress their input, y = x. A skip connection is exactly right from the first step while
    linear_tanh has to be trained and tanh distorts, so DARTS piles weight onto skip_connect:
    the collapse of long DARTS searches, in a few seconds."""
    module = tmp_path / "identity_task.py"
    module.write_text(IDENTITY_TASK)
    space = {"kind": "mlp", "ops": ["none", "skip_connect", "linear_tanh", "tanh"], "cell": {"inputs": 2, "nodes": 3},
             "cells": 1, "width": 8, "in_features": 8, "classes": 8, "max_skip": max_skip}
    return {
        "name": "identity-collapse",
        "levels": {
            "upper": {"variables": {"arch": {"kind": "architecture", "space": space}}, "objective": f"{module}:loss",
                      "data": {"source": f"{module}:data", "kwargs": {"part": "val"}, "batch_size": 64},
                      "solver": {"name": "adam", "lr": 0.05, "betas": [0.5, 0.999]}},
            "lower": {"parent": "upper", "variables": {"net": {"kind": "supernet", "architecture": "arch"}},
                      "objective": f"{module}:loss", "data": {"source": f"{module}:data", "kwargs": {"part": "train"}, "batch_size": 64},
                      "solver": {"name": "momentum", "lr": 0.05, "momentum": 0.9, "steps": 1}},
        },
        "engine": {"kind": "darts", "order": 1, **(engine or {})},
        "monitor": "bilevel.nas:monitor",
        "run": {"device": "cpu", "seed": 0, "steps": steps, "monitor_every": steps, "checkpoint_every": None,
                "out": str(tmp_path / "run")},
    }


@pytest.fixture(scope="module")
def collapsed_search(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[dict]]:
    """120 steps of first-order DARTS on the identity task, with max_skip = 1: the spec and the
    metrics records."""
    tmp_path = tmp_path_factory.mktemp("collapse")
    loaded = spec_from_data(_identity_search(tmp_path, steps=120, max_skip=1))
    bilevel.run(loaded, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return loaded, records


def test_a_search_that_collapses_to_skips_derives_a_guarded_cell(collapsed_search) -> None:
    """Without the guard the searched normal cell has more skip connections than max_skip = 1
    allows; the genotype the run writes (the guarded derivation) has one, on the same edges."""
    loaded, records = collapsed_search
    space = loaded.spec.levels["upper"].variables["arch"].space
    alpha = torch.tensor(records[-1]["monitor"]["alpha_normal"])  # the softmaxed weights at the end
    skip = space.ops.index("skip_connect")
    assert int((alpha.argmax(dim=1) == skip).sum()) > alpha.shape[0] / 2  # skip dominates most edges: collapse

    unguarded = derive_genotype({"normal": alpha}, space, max_skip=None)
    written = Genotype.load(Path(loaded.spec.run.out) / "genotype.json")
    assert unguarded.skip_count() > space.max_skip
    assert written.skip_count() == space.max_skip == records[-1]["monitor"]["skip_normal"]
    assert written.edges("normal") == unguarded.edges("normal")
    assert written == derive_genotype({"normal": alpha}, space)


def test_the_eigenvalue_early_stop_ends_a_collapsing_search_before_the_collapse(tmp_path: Path, collapsed_search) -> None:
    """DARTS-ES (default window and lookback, 5 estimates each) on the same search: the dominant
    eigenvalue of the validation Hessian in alpha grows as weight moves onto the skips; the run
    stops at an estimate whose window mean exceeds the one 5 estimates before by more than
    1 / 0.75, and ends with that earlier architecture, whose derived cell (unguarded) has fewer
    skip connections than the cell the full search collapses to."""
    every, ratio = 5, 0.75
    engine = {"eigen_every": every, "eigen_iters": 10, "early_stop_ratio": ratio}
    config = DartsConfig(order=1, **engine)
    window, lookback = config.eigen_window, config.eigen_lookback
    trace: dict[int, torch.Tensor] = {}
    loaded = spec_from_data(_identity_search(tmp_path, steps=120, max_skip=1, engine=engine))
    result = bilevel.run(loaded, progress=False,
                         on_step=lambda step, x, y: trace.__setitem__(step, torch.cat([p.reshape(-1) for p in x])))
    assert result.result["status"] == "stopped_early" and "DARTS-ES" in result.result["stop_reason"]
    stopped = result.result["steps"]
    assert stopped < 120 and (stopped + 1) % every == 0  # at an estimate

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["eigenvalue"] for r in records if "eigenvalue" in r]  # every estimate before the stopping one
    assert len(logged) == (stopped + 1) // every - 1 >= window + lookback - 1
    assert logged[-1] > logged[0]  # the curvature grew
    then = sum(logged[len(logged) + 1 - window - lookback : len(logged) + 1 - lookback]) / window
    stated = re.search(r"grew from ([0-9.eE+-]+) to ([0-9.eE+-]+)", result.result["stop_reason"])
    assert stated is not None and float(stated.group(1)) == pytest.approx(then, rel=1e-3)
    assert float(stated.group(1)) / float(stated.group(2)) < ratio
    assert torch.allclose(torch.cat([p.reshape(-1) for p in result.x]), trace[stopped - lookback * every])

    restored = compile_spec(loaded).upper.view(result.x)["arch"]()
    space = restored.space
    collapsed = torch.tensor(collapsed_search[1][-1]["monitor"]["alpha_normal"])
    assert (derive_genotype(restored, space, max_skip=None).skip_count()
            < derive_genotype({"normal": collapsed}, space, max_skip=None).skip_count())
