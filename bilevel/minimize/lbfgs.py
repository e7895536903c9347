"""Limited-memory BFGS with a line search that keeps the loop capturable.

J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer 2006: Algorithm 7.4 (the
two-loop recursion) and 7.5 (L-BFGS); D. C. Liu and J. Nocedal, "On the limited memory BFGS method
for large scale optimization", Math. Programming 45, 1989.

For a smooth G on the flattened variables y, with the m most recent pairs

    s_i = y_{i+1} - y_i,   u_i = g_{i+1} - g_i,   rho_i = 1 / (s_i^T u_i),

the direction is d = -H g, H the L-BFGS approximation of the inverse Hessian built by the two-loop
recursion from H_0 = gamma I with gamma = s^T u / u^T u of the newest pair (Nocedal & Wright
eq. 7.20), or gamma = lr before any pair is stored (the first step is then -lr g). A pair is
stored only when s^T u > 0, which strong convexity guarantees (s^T u >= mu ||s||^2); where d is
not a descent direction (rounding) the memory is dropped and d = -lr g.

**The line search, one trial per iteration.** Each iteration evaluates G and its gradient once,
at the trial point y + a d, and accepts it when Armijo's test holds (``stopping.armijo``): then
y, g and the memory move and the next trial starts at a = 1; else nothing moves but a <- a *
backtrack, and the next iteration tries the shorter step along the same direction (the memory and
g did not change, so d is the same). This is backtracking (Nocedal & Wright, Algorithm 3.1)
spread over iterations: every decision is a ``torch.where`` on the device, so the loop has no host
synchronization and a static shape (capturable in a CUDA graph), and each iteration costs exactly
one gradient evaluation, with unit steps accepted almost always once the curvature pairs fit G.

The memory lives inside one solve: a warm-started solve (the next outer step) starts from the
previous solution with an empty memory, since the pairs describe G at the previous upper
variables. Cost per iteration: one gradient, 4m + O(1) vector operations on the flat variables;
memory 2m copies of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.tree import tree_flatten as flatten
from bilevel.linalg.tree import tree_unflatten as unflatten
from bilevel.minimize.result import Minimized
from bilevel.minimize.stopping import ResidualStop, armijo

__all__ = ["lbfgs"]

Tree = tuple[Tensor, ...]


def lbfgs(
    value_and_grad: Callable[[Tree], tuple[Tensor, Tree]],
    y0: Sequence[Tensor],
    steps: int,
    lr: float,
    history: int = 10,
    tol: float | None = None,
    c1: float = 1e-4,
    backtrack: float = 0.5,
    check_every: int = 10,
    sync: bool = True,
) -> Minimized:
    """Minimize G from y0 with at most ``steps`` iterations (gradient evaluations, plus one at y0).

    ``value_and_grad(y) -> (G(y), grad G(y))`` on tuples shaped like y0 (detached results). With
    ``tol`` the solve stops at the first iterate with ||grad G|| <= tol (``stopping.ResidualStop``;
    ``sync``: whether the loop may read that on the host to end early)."""
    like = tuple(y0)

    def evaluate(flat: Tensor) -> tuple[Tensor, Tensor]:
        value, grads = value_and_grad(unflatten(flat, like))
        return value.detach(), flatten(grads).detach()

    y = flatten(like).detach()
    f, g = evaluate(y)
    n, dtype, device = y.numel(), y.dtype, y.device
    S = torch.zeros(history, n, dtype=dtype, device=device)
    U = torch.zeros(history, n, dtype=dtype, device=device)
    rho = torch.zeros(history, dtype=dtype, device=device)
    first = torch.full((), lr, dtype=dtype, device=device)
    gamma, step = first, torch.ones((), dtype=dtype, device=device)
    taken = torch.zeros((), dtype=torch.long, device=device)
    stop = ResidualStop(tol, check_every, sync, y)
    evaluations = 1
    for index in range(steps):
        active = stop.observe(torch.linalg.vector_norm(g))
        if stop.exit(index):  # read before the iteration's work: a frozen iteration is not computed
            break
        d = -_two_loop(g, S, U, rho, gamma)
        slope = torch.dot(g, d)
        descent = slope < 0
        d = torch.where(descent, d, -first * g)
        slope = torch.where(descent, slope, -first * torch.dot(g, g))
        reset = active & ~descent
        rho = torch.where(reset, torch.zeros_like(rho), rho)
        gamma = torch.where(reset, first, gamma)

        trial = y + step * d
        f_trial, g_trial = evaluate(trial)
        evaluations += 1
        accept = active & armijo(f_trial, f, step, slope, c1)
        s, u = trial - y, g_trial - g
        su = torch.dot(s, u)
        store = accept & (su > torch.finfo(dtype).eps * torch.dot(u, u))
        S = torch.where(store, torch.cat((S[1:], s[None])), S)
        U = torch.where(store, torch.cat((U[1:], u[None])), U)
        rho = torch.where(store, torch.cat((rho[1:], (1 / torch.where(store, su, 1.0))[None])), rho)
        gamma = torch.where(store, su / torch.where(store, torch.dot(u, u), 1.0), gamma)
        y = torch.where(accept, trial, y)
        f = torch.where(accept, f_trial, f)
        g = torch.where(accept, g_trial, g)
        step = torch.where(accept, torch.ones_like(step), torch.where(active, step * backtrack, step))
        taken = taken + active.long()
    residual = torch.linalg.vector_norm(g)
    stop.observe(residual)
    return Minimized(unflatten(y, like), unflatten(g, like), f, residual, taken, stop.done, evaluations)


def _two_loop(g: Tensor, S: Tensor, U: Tensor, rho: Tensor, gamma: Tensor) -> Tensor:
    """H g by the two-loop recursion (Nocedal & Wright, Algorithm 7.4) over the stored pairs, newest
    last; entries with rho = 0 (not stored yet, or dropped) contribute nothing."""
    m = rho.shape[0]
    q = g
    alphas = [torch.zeros((), dtype=g.dtype, device=g.device)] * m
    for i in reversed(range(m)):
        alphas[i] = rho[i] * torch.dot(S[i], q)
        q = q - alphas[i] * U[i]
    r = gamma * q
    for i in range(m):
        beta = rho[i] * torch.dot(U[i], r)
        r = r + (alphas[i] - beta) * S[i]
    return r
