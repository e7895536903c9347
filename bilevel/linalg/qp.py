"""A batch of small dense convex QPs solved at once by a primal-dual interior-point method.

For every instance i of the batch (the leading dimension of every argument),

    minimize_y  1/2 y^T Q y + q^T y     subject to   G y <= h  (m rows),   A y = b  (p rows),

with Q symmetric positive (semi)definite. The method is Mehrotra's predictor-corrector on the
KKT conditions with slacks s = h - G y >= 0 and multipliers z >= 0 (inequalities), nu (equalities):

    r_d = Q y + q + G^T z + A^T nu = 0,   r_p = G y + s - h = 0,   r_e = A y - b = 0,   s o z = 0

(S. Mehrotra, "On the implementation of a primal-dual interior point method", SIAM J. Optim. 2,
1992; S. Wright, *Primal-Dual Interior-Point Methods*, SIAM 1997, ch. 10; the batched form is the
one of B. Amos and J. Z. Kolter, "OptNet: Differentiable Optimization as a Layer in Neural
Networks", ICML 2017). Each Newton step eliminates the slacks and the inequality multipliers,

    [Q + G^T D G   A^T] [dy ]   [-r_d + G^T S^{-1} (r_c - Z r_p)]
    [A             0  ] [dnu] = [-r_e                           ],     D = Z S^{-1},

    ds = -r_p - G dy,   dz = -S^{-1} (r_c + Z ds),

once with r_c = s o z (the affine predictor) and once with r_c = s o z + ds_a o dz_a - sigma mu
(the corrector; sigma = (mu_a / mu)^3), both solves sharing one LU factorization of the
(n + p)-square matrix per instance. Steps stop at 0.99 of the distance to the boundary.

Every iteration runs on the device without host synchronization and with static shapes (a
captured CUDA graph can replay it): an instance whose KKT residual is below ``tol`` is frozen
(``torch.where``), the others go on, so one ill-conditioned instance never stops the batch
early, and a converged one never drifts. Close to the solution the eliminated system grows
ill-conditioned (D has entries of order 1/s on active rows), and past the attainable accuracy
a step can make the residual larger: each instance returns the iterate with the smallest KKT
residual it reached, and a step that is not finite is not taken. The matrices are formed explicitly: this is for small
problems (tens of variables per instance), where a dense factorization per instance is cheapest
and thousands of instances fill a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QPSolution", "default_qp_tolerance", "solve_qp"]


@dataclass(frozen=True)
class QPSolution:
    """Primal and dual solutions of each instance, shapes (N, n), (N, m), (N, p), (N, m)."""

    y: Tensor
    z: Tensor
    """Inequality multipliers, >= 0 (0 on inactive rows)."""
    nu: Tensor
    """Equality multipliers."""
    s: Tensor
    """Slacks h - G y, >= 0 (0 on active rows)."""
    residual: Tensor
    """Per instance: max(|r_d|, |r_p|, |r_e|, mean s o z), the largest violation of the KKT conditions, shape (N,)."""
    iterations: int


def default_qp_tolerance(dtype: torch.dtype) -> float:
    """eps^(3/4) of the dtype: about 2e-12 in float64, 7e-6 in float32."""
    return float(torch.finfo(dtype).eps) ** 0.75


def _residual(r_d: Tensor, r_p: Tensor, r_e: Tensor, s: Tensor, z: Tensor) -> Tensor:
    parts = [r_d.abs().amax(-1)]
    if r_p.shape[-1]:
        parts += [r_p.abs().amax(-1), (s * z).mean(-1)]
    if r_e.shape[-1]:
        parts.append(r_e.abs().amax(-1))
    return torch.stack(parts).amax(0)


def _to_boundary(v: Tensor, dv: Tensor) -> Tensor:
    """Per instance, the largest a in [0, 1] with v + a dv >= 0 (v > 0)."""
    ratio = torch.where(dv < 0, -v / torch.where(dv < 0, dv, -1.0), torch.ones_like(v))
    return ratio.amin(-1).clamp(max=1.0)


def solve_qp(Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
             iterations: int = 40, tol: float | None = None) -> QPSolution:
    """Solve the batch of QPs above: Q (N, n, n), q (N, n), G (N, m, n), h (N, m), A (N, p, n),
    b (N, p); m or p may be 0. ``tol`` (default ``default_qp_tolerance``) freezes an instance once
    its KKT residual is below it; at most ``iterations`` Newton steps."""
    tol = default_qp_tolerance(q.dtype) if tol is None else tol
    N, n = q.shape
    m, p = G.shape[1], A.shape[1]
    Gt, At = G.transpose(1, 2), A.transpose(1, 2)
    zeros_pp = q.new_zeros(N, p, p)

    def kkt_matrix(top_left: Tensor) -> Tensor:
        return torch.cat([torch.cat([top_left, At], 2), torch.cat([A, zeros_pp], 2)], 1)

    def newton(lu: tuple[Tensor, Tensor], rhs_y: Tensor, rhs_e: Tensor) -> tuple[Tensor, Tensor]:
        sol = torch.linalg.lu_solve(*lu, torch.cat([rhs_y, rhs_e], 1).unsqueeze(-1)).squeeze(-1)
        return sol[:, :n], sol[:, n:]

    # start: the equality-constrained least-squares point of Q + G^T G (CVXOPT's initialization)
    lu = torch.linalg.lu_factor_ex(kkt_matrix(Q + Gt @ G))[:2]
    y, nu = newton(lu, -q + (Gt @ h.unsqueeze(-1)).squeeze(-1), b)
    s = (h - (G @ y.unsqueeze(-1)).squeeze(-1)).clamp(min=1.0)
    z = torch.ones_like(s)
    if m == 0:  # an equality-constrained QP: that start is its solution
        r_d = (Q @ y.unsqueeze(-1)).squeeze(-1) + q + (At @ nu.unsqueeze(-1)).squeeze(-1)
        r_e = (A @ y.unsqueeze(-1)).squeeze(-1) - b
        return QPSolution(y, s, nu, s, _residual(r_d, s, r_e, s, z), 1)

    best = (y, z, nu, s, torch.full((N,), torch.inf, dtype=q.dtype, device=q.device))

    def keep_best(y: Tensor, z: Tensor, nu: Tensor, s: Tensor, res: Tensor) -> tuple[Tensor, ...]:
        better = res < best[4]
        return tuple(torch.where(better.reshape(-1, *[1] * (new.dim() - 1)), new, old) for new, old in zip((y, z, nu, s, res), best))

    for k in range(iterations + 1):
        r_d = (Q @ y.unsqueeze(-1)).squeeze(-1) + q + (Gt @ z.unsqueeze(-1)).squeeze(-1) + (At @ nu.unsqueeze(-1)).squeeze(-1)
        r_p = (G @ y.unsqueeze(-1)).squeeze(-1) + s - h
        r_e = (A @ y.unsqueeze(-1)).squeeze(-1) - b
        res = _residual(r_d, r_p, r_e, s, z)
        best = keep_best(y, z, nu, s, res)
        if k == iterations:
            break
        active = res > tol
        mu = (s * z).mean(-1, keepdim=True)
        d = z / s
        lu = torch.linalg.lu_factor_ex(kkt_matrix(Q + Gt @ (d.unsqueeze(-1) * G)))[:2]  # no check: no host sync

        def direction(r_c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            rhs = -r_d + (Gt @ ((r_c - z * r_p) / s).unsqueeze(-1)).squeeze(-1)
            dy, dnu = newton(lu, rhs, -r_e)
            ds = -r_p - (G @ dy.unsqueeze(-1)).squeeze(-1)
            return dy, dnu, ds, -(r_c + z * ds) / s

        _, _, ds_a, dz_a = direction(s * z)
        a_aff = torch.minimum(_to_boundary(s, ds_a), _to_boundary(z, dz_a)).unsqueeze(-1)
        mu_aff = ((s + a_aff * ds_a) * (z + a_aff * dz_a)).mean(-1, keepdim=True)
        sigma = (mu_aff / mu.clamp(min=torch.finfo(mu.dtype).tiny)).clamp(0.0, 1.0) ** 3
        dy, dnu, ds, dz = direction(s * z + ds_a * dz_a - sigma * mu)
        a = (0.99 * torch.minimum(_to_boundary(s, ds), _to_boundary(z, dz))).clamp(max=1.0).unsqueeze(-1)
        new = (y + a * dy, nu + a * dnu, s + a * ds, z + a * dz)
        finite = torch.stack([torch.isfinite(t).all(-1) for t in new]).all(0)
        keep = (active & finite).unsqueeze(-1)  # a step that is not finite (a singular system) is not taken
        y, nu, s, z = (torch.where(keep, t, old) for t, old in zip(new, (y, nu, s, z)))

    return QPSolution(*best, iterations)
