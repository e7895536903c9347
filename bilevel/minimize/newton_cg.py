"""Line-search Newton-CG on Hessian-vector products (the one HVP and the one CG of bilevel.linalg).

J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer 2006, Algorithm 7.1
(line search Newton-CG) with the forcing sequence eta_k = min(0.5, sqrt(||g_k||)) of eq. 7.3
(superlinear convergence; quadratic near the solution as eta_k -> 0); R. S. Dembo and
T. Steihaug, "Truncated-Newton algorithms for large-scale unconstrained optimization", Math.
Programming 26, 1983. With a stopping tolerance tol the forcing term is safeguarded from
below so the last linear solve is no more exact than the stop needs (C. T. Kelley, *Iterative
Methods for Linear and Nonlinear Equations*, SIAM 1995, eq. 6.20):
eta_k = min(0.5, max(sqrt(||g_k||), 0.5 tol / ||g_k||)), since the linear model then predicts
||g_{k+1}|| <= 0.5 tol.

Each iteration linearizes G at y (``bilevel.linalg.hvp.Linearization``: the gradient g with its
graph, then Hessian-vector products by double backward), solves H d = -g by CG
(``bilevel.linalg.cg``, at most ``cg_maxiter`` products, stopped on the device once
||H d + g|| <= eta_k ||g||), and takes the first of the step sizes a0, a0 backtrack, ...,
a0 backtrack^(trials - 1) that passes Armijo's test (``stopping.armijo``), each trial one value of
G. All trials are evaluated (no host synchronization: the choice is a ``torch.where``), except in
an eager loop (``sync`` with check_every > 0), which also stops trying at the first
trial that passed and lets CG end once it meets the forcing term. There the first trial is
evaluated with its gradient (a ``Linearization``), which is the next iteration's when the step is
taken (near the solution, almost always), so that an accepted Newton step costs one objective
evaluation instead of two; and the solve returns the linearization at its solution, which the
implicit engine reuses for its linear system. a0 = 1,
or where no trial passed at the previous iteration, where its trials ended (the iterate stayed,
so the next iteration backtracks further along the same Newton direction). Where d is not a
descent direction (H not positive definite: like Algorithm 7.1, the one CG stops at the first
direction of non-positive curvature, so d = 0 when that is the first one), d = -g.

For a strongly convex quadratic with cg_maxiter >= the number of variables, the first Newton step
is exact (in exact arithmetic), which the planner uses for small lower levels. Cost per iteration:
one gradient with its graph, up to cg_maxiter HVPs (each about two gradients), ``trials`` values."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.cg import cg
from bilevel.linalg.hvp import Linearization
from bilevel.linalg.tree import tree_axpy, tree_dot, tree_norm
from bilevel.minimize.result import Minimized
from bilevel.minimize.stopping import ResidualStop, armijo

__all__ = ["newton_cg"]

Tree = tuple[Tensor, ...]


def newton_cg(
    value_and_grad: Callable[[Tree], tuple[Tensor, Tree]],
    value: Callable[[Tree], Tensor],
    linearize: Callable[[Tree], Linearization],
    y0: Sequence[Tensor],
    steps: int,
    cg_maxiter: int = 20,
    tol: float | None = None,
    c1: float = 1e-4,
    backtrack: float = 0.5,
    trials: int = 4,
    check_every: int = 10,
    sync: bool = True,
) -> Minimized:
    """Minimize G from y0 with at most ``steps`` Newton iterations. ``value_and_grad(y)``: G and its
    gradient (detached); ``value(y)``: G alone, without a graph; ``linearize(y)``: the
    Linearization of G at y. ``tol``, ``check_every``, ``sync``: the residual stop
    (``stopping.ResidualStop``)."""
    y = tuple(p.detach() for p in y0)
    like = y[0]
    stop = ResidualStop(tol, check_every, sync, like)
    start = torch.ones((), dtype=like.dtype, device=like.device)
    taken = torch.zeros((), dtype=torch.long, device=like.device)
    evaluations = products = 0
    last = None
    ahead: Linearization | None = None  # eager: the linearization at the accepted first trial point
    at_solution: Linearization | None = None
    for index in range(steps):
        lin = ahead if ahead is not None else linearize(y)
        evaluations += ahead is None
        ahead = None
        g = tuple(t.detach() for t in lin.grad_y)
        f = lin.value.detach()
        norm = tree_norm(g)
        active = stop.observe(norm)
        if stop.exit(index):  # read before the iteration's work: a frozen iteration is not computed
            last, at_solution = (f, g), lin
            break
        forcing = torch.sqrt(norm) if tol is None else torch.maximum(torch.sqrt(norm), 0.5 * tol / norm)
        forcing = torch.clamp(forcing, max=0.5)
        solved = cg(lin.hvp, tuple(-t for t in g), None, cg_maxiter, forcing, exit_every=1 if stop.every else 0,
                    stop_at_negative_curvature=True)
        products += solved.matvecs
        d = tuple(t.detach() for t in solved.solution)
        slope = tree_dot(g, d)
        descent = slope < 0
        d = tuple(torch.where(descent, t, -u) for t, u in zip(d, g))
        slope = torch.where(descent, slope, -norm * norm)

        chosen = torch.zeros_like(start)
        found = torch.zeros((), dtype=torch.bool, device=like.device)
        for j in range(trials):
            a = start * backtrack**j
            if stop.every and j == 0:  # eager: G there with its gradient, the next iteration's if accepted
                candidate = linearize(tree_axpy(a, d, y))
                evaluations += 1
                trial = candidate.value.detach()
            else:
                with torch.no_grad():
                    trial = value(tree_axpy(a, d, y)).detach()
            ok = armijo(trial, f, a, slope, c1)
            chosen = torch.where(found | ~ok, chosen, a)
            found = found | ok
            if stop.every and bool(found):  # eager: the remaining trials cannot change the choice
                ahead = candidate if j == 0 and bool(active) else None  # the step is taken: it is the new y
                break
        start = torch.where(active, torch.where(found, torch.ones_like(start), start * backtrack**trials), start)
        y = stop.keep(y, tree_axpy(chosen, d, y))  # chosen = 0 where no trial passed
        taken = taken + active.long()
    if last is None and ahead is not None:  # the steps ran out at an accepted trial point: G is known there
        last, at_solution = (ahead.value.detach(), tuple(t.detach() for t in ahead.grad_y)), ahead
    f, g = last if last is not None else value_and_grad(y)
    evaluations += last is None
    residual = tree_norm(g).detach()
    stop.observe(residual)
    return Minimized(y, tuple(t.detach() for t in g), f.detach(), residual, taken, stop.done, evaluations, products,
                     at_solution)
