"""One HVP, one mixed VJP, CG, Neumann and direct solves on tuples of tensors (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.linalg import Linearization, cg, direct, neumann
from bilevel.linalg.project import project_affine
from bilevel.optim import InnerOptimizer
from bilevel.spec import OptimizerSpec

D = torch.float64


def _spd(n: int, seed: int, condition: float = 20.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    return q @ torch.diag(torch.linspace(1.0, condition, n, dtype=D)) @ q.T


def _split_matvec(A: torch.Tensor, sizes: list[int]):
    def matvec(v):
        flat = A @ torch.cat([u.reshape(-1) for u in v])
        return tuple(torch.split(flat, sizes))

    return matvec


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(0, 1000), st.booleans())
def test_cg_solves_spd_systems(n: int, seed: int, warm: bool) -> None:
    A = _spd(n, seed)
    sizes = [n // 2, n - n // 2] if n > 2 else [1, 1]
    b = tuple(torch.randn(s, dtype=D, generator=torch.Generator().manual_seed(seed + 1)) for s in sizes)
    x0 = tuple(torch.ones(s, dtype=D) for s in sizes) if warm else None
    result = cg(_split_matvec(A, sizes), b, x0, maxiter=3 * n, tol=1e-12)
    exact = torch.linalg.solve(A, torch.cat(b))
    assert torch.allclose(torch.cat(result.solution), exact, rtol=1e-8, atol=1e-10)
    assert float(result.residual) < 1e-8
    assert result.matvecs == 3 * n + (1 if warm else 0)


def test_cg_on_several_tensors_runs_on_their_concatenation() -> None:
    """A single system of several tensors is solved on one flat vector: the same iterates, bit for
    bit, as CG on the concatenated system; the solution comes back in the tensors' shapes, and
    stays differentiable in b (d x / d b = A^{-1})."""
    A = _spd(7, 3)
    shapes = [(2, 2), (3,)]
    b = tuple(torch.randn(*s, dtype=D, generator=torch.Generator().manual_seed(k)).requires_grad_(True)
              for k, s in enumerate(shapes))

    def matvec(v):
        flat = A @ torch.cat([u.reshape(-1) for u in v])
        return flat[:4].reshape(2, 2), flat[4:]

    for maxiter in (1, 3, 7):
        split = cg(matvec, b, maxiter=maxiter, tol=0.0)
        whole = cg(lambda v: (A @ v[0],), (torch.cat([u.reshape(-1) for u in b]),), maxiter=maxiter, tol=0.0)
        assert [u.shape for u in split.solution] == [torch.Size(s) for s in shapes]
        assert torch.equal(torch.cat([u.reshape(-1) for u in split.solution]), whole.solution[0])
        assert torch.equal(split.residual, whole.residual) and split.matvecs == whole.matvecs
    solved = cg(matvec, b, maxiter=7, tol=0.0).solution
    (grad,) = torch.autograd.grad(solved[1][0], b[1])
    assert torch.allclose(grad, torch.linalg.inv(A)[4, 4:], atol=1e-10)
    mixed = (torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=D))  # not one dtype: solved per tensor
    out = cg(lambda v: (2 * v[0], 2 * v[1]), mixed, maxiter=2)
    assert [u.dtype for u in out.solution] == [torch.float32, D]
    assert torch.allclose(out.solution[1], torch.full((2,), 0.5, dtype=D), atol=1e-15)


def test_cg_per_instance_on_several_tensors_runs_on_one_row_per_instance() -> None:
    ops = torch.stack([_spd(5, 11), _spd(5, 12, condition=100.0)])
    b = (torch.randn(2, 3, dtype=D, generator=torch.Generator().manual_seed(0)),
         torch.randn(2, 2, dtype=D, generator=torch.Generator().manual_seed(1)))

    def matvec(v):
        flat = torch.einsum("kij,kj->ki", ops, torch.cat(v, dim=1))
        return flat[:, :3], flat[:, 3:]

    split = cg(matvec, b, maxiter=4, tol=0.0, per_instance=True)
    whole = cg(lambda v: (torch.einsum("kij,kj->ki", ops, v[0]),), (torch.cat(b, dim=1),), maxiter=4, tol=0.0,
               per_instance=True)
    assert torch.equal(torch.cat(split.solution, dim=1), whole.solution[0]) and torch.equal(split.residual, whole.residual)
    exact = cg(matvec, b, maxiter=10, tol=1e-14, per_instance=True).solution
    for k in range(2):
        assert torch.allclose(torch.cat([u[k] for u in exact]), torch.linalg.solve(ops[k], torch.cat([u[k] for u in b])),
                              atol=1e-11)


def test_cg_freezes_once_converged_and_keeps_the_last_update() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=D))
    b = (torch.tensor([1.0, 1.0, 1.0], dtype=D),)
    matvec = _split_matvec(A, [3])
    # 3 distinct eigenvalues: exact after 3 iterations; 20 iterations must not drift or produce NaN
    result = cg(matvec, b, maxiter=20, tol=1e-14)
    assert torch.allclose(result.solution[0], torch.tensor([1.0, 0.5, 0.25], dtype=D), atol=1e-14)
    assert torch.isfinite(result.residual)
    # stopping after exactly the converging iteration returns the updated iterate, not the previous one
    three = cg(matvec, b, maxiter=3, tol=0.0)
    assert torch.allclose(three.solution[0], torch.tensor([1.0, 0.5, 0.25], dtype=D), atol=1e-12)


def test_cg_through_negative_curvature_solves_an_indefinite_system() -> None:
    """The IFT needs only a nonsingular A: by default CG goes on through negative curvature and
    reaches A^{-1} b of a symmetric indefinite system (iMAML's I + H/lam with a nonconvex loss)."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=D))
    b = (torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=D),)
    result = cg(_split_matvec(A, [4]), b, maxiter=10, tol=1e-12)
    assert torch.allclose(result.solution[0], torch.linalg.solve(A, b[0]), atol=1e-12)
    # a zero curvature is a breakdown: frozen where it is, finite, not converged
    zero = cg(_split_matvec(torch.diag(torch.tensor([1.0, -1.0], dtype=D)), [2]), (torch.ones(2, dtype=D),), maxiter=5)
    assert torch.equal(zero.solution[0], torch.zeros(2, dtype=D)) and float(zero.residual) == 1.0


def test_cg_stops_at_the_first_direction_of_non_positive_curvature_when_asked() -> None:
    """Newton-CG's truncation: the iterate stays where it was before the first <p, A p> <= 0,
    finite, and the residual says that it did not converge."""
    b = (torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=D),)
    negative = cg(_split_matvec(-torch.eye(4, dtype=D), [4]), b, maxiter=10, tol=1e-12, stop_at_negative_curvature=True)
    assert torch.equal(negative.solution[0], torch.zeros(4, dtype=D))
    assert float(negative.residual) == 1.0
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=D))  # <b, A b> = 5 > 0: one step, then negative curvature
    matvec = _split_matvec(A, [4])
    runs = [cg(matvec, b, maxiter=k, tol=1e-12, stop_at_negative_curvature=True) for k in range(1, 11)]
    assert all(bool(torch.isfinite(r.solution[0]).all()) for r in runs)
    one_step = torch.full((4,), 4.0 / 5.0, dtype=D)  # alpha = <b, b> / <b, A b>
    assert torch.allclose(runs[0].solution[0], one_step, atol=1e-15)
    frozen = [k for k, r in enumerate(runs) if torch.equal(r.solution[0], runs[-1].solution[0])]
    assert frozen and frozen[0] < 9, "the iterate must stop moving once the curvature is non-positive"
    assert float(runs[-1].residual) > 1e-3
    eager = cg(matvec, b, maxiter=10, tol=1e-12, exit_every=1, stop_at_negative_curvature=True)
    assert torch.equal(eager.solution[0], runs[-1].solution[0])


def test_cg_per_instance_stops_only_the_instance_of_negative_curvature() -> None:
    spd = _spd(3, 7)
    ops = torch.stack([spd, -torch.eye(3, dtype=D)])
    b = (torch.ones(2, 3, dtype=D),)
    result = cg(lambda v: (torch.einsum("kij,kj->ki", ops, v[0]),), b, maxiter=9, tol=1e-13, per_instance=True,
                stop_at_negative_curvature=True)
    assert torch.allclose(result.solution[0][0], torch.linalg.solve(spd, b[0][0]), rtol=1e-10, atol=1e-12)
    assert torch.equal(result.solution[0][1], torch.zeros(3, dtype=D))
    assert float(result.residual[0]) < 1e-10 and float(result.residual[1]) == 1.0


def test_neumann_converges_below_2_over_L_and_reports_divergence_above() -> None:
    A = _spd(6, 0, condition=10.0)
    b = (torch.randn(6, dtype=D, generator=torch.Generator().manual_seed(3)),)
    matvec = _split_matvec(A, [6])
    good = neumann(matvec, b, lr=1.0 / 10.0, maxiter=600)
    assert torch.allclose(good.solution[0], torch.linalg.solve(A, b[0]), rtol=1e-8)
    assert float(good.residual) < 1e-8
    bad = neumann(matvec, b, lr=2.5 / 10.0, maxiter=60)
    assert float(bad.residual) > 1e3


def test_direct_solve_with_ridge() -> None:
    A = _spd(5, 4)

    def batched(basis):
        return basis @ A.T

    b = (torch.randn(2, dtype=D), torch.randn(3, dtype=D))
    result = direct(batched, b, ridge=0.5)
    expected = torch.linalg.solve(A + 0.5 * torch.eye(5, dtype=D), torch.cat(b))
    assert torch.allclose(torch.cat(result.solution), expected)
    assert result.solution[0].shape == (2,) and result.solution[1].shape == (3,)


def _objective(x, y):
    (a,) = x
    u, v = y
    return (a[0] * u**3).sum() + (torch.sin(a[1] * v) * u.sum()).sum() + (a**2).sum() * (v**2).sum()


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hvp_and_mixed_vjp_match_explicit_second_derivatives(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, dtype=D, generator=gen),)
    y = (torch.randn(3, dtype=D, generator=gen), torch.randn(2, dtype=D, generator=gen))
    lin = Linearization(_objective, x, y, mode)
    v = (torch.randn(3, dtype=D, generator=gen), torch.randn(2, dtype=D, generator=gen))

    def flat_objective(xf, yf):
        return _objective((xf,), (yf[:3], yf[3:]))

    xf, yf = x[0], torch.cat(y)
    H = torch.autograd.functional.hessian(lambda t: flat_objective(xf, t), yf)
    mixed = torch.autograd.functional.jacobian(lambda s: torch.autograd.functional.jacobian(lambda t: flat_objective(s, t), yf, create_graph=True), xf)
    vf = torch.cat(v)
    assert torch.allclose(torch.cat(lin.hvp(v)), H @ vf, atol=1e-12)
    assert torch.allclose(lin.vjp_x(v, retain_graph=True)[0], mixed.T @ vf, atol=1e-12)
    if mode == "reverse":
        rows = lin.hvp_batched(torch.eye(5, dtype=D))
        assert torch.allclose(rows, H, atol=1e-12)


def test_affine_projection_is_exact_for_equalities_and_a_halfspace() -> None:
    w = (torch.randn(3, dtype=D), torch.randn(2, dtype=D))

    def equalities(t):
        return torch.stack([t[0].sum() + t[1].sum() - 1, t[0][0] - t[1][1]])

    projected = project_affine(equalities, w, equality=True)
    assert torch.allclose(equalities(projected), torch.zeros(2, dtype=D), atol=1e-12)
    # the projection moves along the rows of the Jacobian only: a second projection is a no-op
    again = project_affine(equalities, projected, equality=True)
    assert torch.allclose(torch.cat(again), torch.cat(projected), atol=1e-12)

    def halfspace(t):
        return (t[0].sum() + t[1].sum() + 10).reshape(1)

    inside = project_affine(lambda t: (t[0].sum() + t[1].sum() - 100).reshape(1), w, equality=False)
    assert torch.allclose(torch.cat(inside), torch.cat(w))
    moved = project_affine(halfspace, w, equality=False)
    assert float(halfspace(moved)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_inner_optimizers_match_torch_optim(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(4, dtype=D, generator=gen)
    spec = OptimizerSpec(name=name, lr=0.05, momentum=0.8)
    ours = InnerOptimizer(spec)
    y = (torch.zeros(4, dtype=D),)
    state = ours.init(y)
    p = torch.zeros(4, dtype=D, requires_grad=True)
    reference = {"sgd": lambda: torch.optim.SGD([p], lr=0.05), "momentum": lambda: torch.optim.SGD([p], lr=0.05, momentum=0.8),
                 "adam": lambda: torch.optim.Adam([p], lr=0.05)}[name]()
    for _ in range(7):
        grads = (2 * (y[0] - target) + 4 * y[0] ** 3,)
        y, state = ours.step(y, grads, state)
        reference.zero_grad()
        (((p - target) ** 2).sum() + (p**4).sum()).backward()
        reference.step()
    assert torch.allclose(y[0], p.detach(), atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=12), st.floats(0.1, 4.0))
def test_simplex_projection_is_the_nearest_point_of_the_simplex(values, radius) -> None:
    from bilevel.linalg.project import project_simplex

    v = torch.tensor(values, dtype=D)
    p = project_simplex(v, radius)
    assert (p >= 0).all() and float(p.sum()) == pytest.approx(radius, abs=1e-9)
    # KKT: p = max(v - theta, 0) for one theta, i.e. v - p is constant on the support and >= it off it
    support = p > 0
    theta = (v - p)[support]
    assert float(theta.max() - theta.min()) < 1e-9
    if (~support).any():
        assert float(v[~support].max()) <= float(theta.mean()) + 1e-9


def test_variables_are_projected_onto_their_simplex(tmp_path) -> None:
    from bilevel import run
    from bilevel.spec import spec_from_data
    from problems.toy import quadratic_spec

    data = quadratic_spec(inner_steps=50, steps=5).model_dump(mode="json")
    data["levels"]["upper"]["variables"]["x"]["set"] = {"kind": "simplex", "radius": 2.0}
    x = run(spec_from_data(data), out=tmp_path, progress=False).x[0]
    assert (x >= 0).all() and float(x.sum()) == pytest.approx(2.0, abs=1e-12)
