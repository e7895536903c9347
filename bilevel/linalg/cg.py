"""Conjugate gradient on tuples of tensors, for symmetric positive-definite operators.

Hestenes & Stiefel (1952). Runs exactly ``maxiter`` iterations so that the loop has a static
shape (capturable in a CUDA graph, no host synchronization); once the residual falls below
``tol * ||b||`` the step sizes are masked to zero on the device, which freezes the iterate. An
eager caller may let it end early instead (``exit_every``: a documented host read).

A direction of zero curvature, <p, A p> = 0 with a residual still above the tolerance, is a
breakdown: there the iterate is frozen instead of stepping by alpha = inf. A negative curvature
does not stop CG by default: the implicit function theorem needs only a nonsingular A, and CG on
a symmetric indefinite system without breakdown still converges to A^{-1} b (what the IFT and
iMAML's system I + H/lam with a nonconvex task loss need, and what TorchOpt's CG computes too).
``stop_at_negative_curvature`` (Newton-CG, which minimizes: Nocedal & Wright 2006, Algorithm 7.1;
Steihaug 1983) freezes the iterate at the first direction with <p, A p> <= 0 instead; its
residual then shows that it did not converge. A positive-definite operator meets neither, so its
iterates are the same either way.

``per_instance``: the leading dimension of every tensor indexes independent problems with a
block-diagonal operator (a batch of instances); each gets its own step sizes and stopping test,
so every instance follows exactly the iterates of its own CG.

A system of several tensors (weights and biases, say) is solved on their concatenation (per
instance: one row of a matrix each): the operator sees views of one flat vector, and each inner
product or update is one kernel instead of one per tensor (on a CPU, where small kernels cost
their launch, the vector work of an iteration then costs about a third of a Hessian-vector
product less)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.result import SolveResult
from bilevel.linalg.tree import (instance_axpy, instance_dot, instance_flatten, instance_unflatten, tree_flatten, tree_sub,
                                 tree_unflatten, tree_zeros_like)
from bilevel.linalg.tree import tree_axpy as _tree_axpy
from bilevel.linalg.tree import tree_dot as _tree_dot

__all__ = ["cg"]

Tree = tuple[Tensor, ...]


def cg(
    matvec: Callable[[Tree], Tree],
    b: Sequence[Tensor],
    x0: Sequence[Tensor] | None = None,
    maxiter: int = 20,
    tol: float | Tensor = 1e-10,
    per_instance: bool = False,
    exit_every: int = 0,
    stop_at_negative_curvature: bool = False,
) -> SolveResult:
    """Solve A x = b for SPD A given as ``matvec``.

    Iteration (r = b - A x, p = r):
        alpha = <r, r> / <p, A p>;  x += alpha p;  r -= alpha A p
        beta = <r_new, r_new> / <r, r>;  p = r_new + beta p
    The returned solution includes the last update (a stopped-early iterate is never stale).
    The residual is a 0-d tensor, or one per instance. ``tol`` may be a 0-d tensor (computed on
    the device: Newton-CG's forcing term). ``exit_every`` > 0 (eager callers only): every that many
    iterations the stopping test is read on the host (one synchronization per reading, the only one)
    and the loop ends once every residual is below it; the result is the same as without, whose
    remaining iterations would be frozen."""
    b = tuple(b)
    if len(b) > 1 and len({(t.dtype, t.device) for t in b}) == 1:  # one flat vector (per instance: one row each)
        join, split = (instance_flatten, instance_unflatten) if per_instance else (tree_flatten, tree_unflatten)
        solved = cg(lambda v: (join(matvec(split(v[0], b))),), (join(b),), None if x0 is None else (join(x0),),
                    maxiter, tol, per_instance, exit_every, stop_at_negative_curvature)
        return SolveResult(split(solved.solution[0], b), solved.residual, solved.matvecs)
    tree_dot, tree_axpy = (instance_dot, instance_axpy) if per_instance else (_tree_dot, _tree_axpy)
    matvecs = 0
    if x0 is None:
        x = tree_zeros_like(b)
        r = b
    else:
        x = tuple(x0)
        r = tree_sub(b, matvec(x))
        matvecs += 1
    p = r
    rs = tree_dot(r, r)
    threshold = (tol * tol) * tree_dot(b, b)
    zero = torch.zeros_like(rs)
    curved = torch.ones_like(rs, dtype=torch.bool)  # no breakdown (or negative curvature, when it stops) met yet
    for index in range(maxiter):
        ap = matvec(p)
        matvecs += 1
        curvature = tree_dot(p, ap)
        curved = curved & ((curvature > 0) if stop_at_negative_curvature else (curvature != 0))
        active = (rs > threshold) & curved
        alpha = torch.where(active, rs / curvature, zero)
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = tree_dot(r, r)
        beta = torch.where(active, rs_new / rs, zero)
        p = tree_axpy(beta, p, r)
        rs = torch.where(active, rs_new, rs)
        if exit_every and (index + 1) % exit_every == 0 and not bool(((rs > threshold) & curved).any()):
            break
    bnorm = torch.sqrt(tree_dot(b, b))
    residual = torch.sqrt(rs) / torch.clamp(bnorm, min=torch.finfo(bnorm.dtype).tiny)
    return SolveResult(x, residual, matvecs)
