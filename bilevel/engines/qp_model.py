"""The QP a lower level declares, read off its objective and constraints by automatic differentiation.

A lower level whose objective is quadratic in y and whose constraints are affine in y is, at the
current upper variables x, the QP

    G(x, y) = 1/2 y^T Q y + q^T y + const,     c(x, y) = G_c y - h <= 0,     e(x, y) = A y - b = 0

(per instance i of a batch: every variable then has a leading dimension N, and the blocks Q_i,
G_c,i, A_i are independent). Its matrices are read without writing them down anywhere in user
code: Q from one batched Hessian-vector product over the per-instance basis (column j of every
Q_i at once, since H is block diagonal: ``Linearization.hvp_batched``, the one HVP), q = grad_y G(y)
- Q y at the current y, the constraint rows from one batched vector-Jacobian product per
constraint function (row k of every instance at once), and h = G_c y - c(y), b = A y - e(y).

What is quadratic is checked, not assumed: the gradient at a second point y + d must equal
grad_y G(y) + Q d (and the constraints' values c(y) + G_c d) to a tolerance of the dtype's
precision; otherwise the objective or a constraint is named in a spec error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg.hvp import Linearization
from bilevel.linalg.tree import zeros_for_none
from bilevel.problem import Params, Problem
from bilevel.spec.errors import SpecError

__all__ = ["InstanceLayout", "LowerQP", "read_qp"]


@dataclass(frozen=True)
class InstanceLayout:
    """How the lower variables of N instances (N = 1 for one problem) map to (N, n) matrices."""

    count: int
    shapes: tuple[torch.Size, ...]
    """Each variable's per-instance shape."""

    @classmethod
    def of(cls, problem: Problem) -> "InstanceLayout":
        lower = problem.lower
        if lower.stacked:
            count = lower.init[0].shape[0]
            return cls(count, tuple(p.shape[1:] for p in lower.init))
        return cls(1, tuple(p.shape for p in lower.init))

    @property
    def size(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    def flat(self, params: Params) -> Tensor:
        """(N, n): each instance's variables, concatenated."""
        return torch.cat([p.reshape(self.count, -1) for p in params], 1)

    def unflat(self, flat: Tensor, stacked: bool) -> Params:
        parts = torch.split(flat, [int(torch.Size(s).numel()) for s in self.shapes], 1)
        return tuple(part.reshape((self.count, *s) if stacked else s) for part, s in zip(parts, self.shapes))

    def basis(self, like: Tensor, stacked: bool) -> Tensor:
        """(n, total): row j is 1 at the j-th variable of every instance (the flat layout of
        ``Linearization.hvp_batched``: each stacked variable whole, instance-major)."""
        n = self.size
        rows = torch.eye(n, dtype=like.dtype, device=like.device)
        parts = torch.split(rows, [int(torch.Size(s).numel()) for s in self.shapes], 1)
        return torch.cat([part.unsqueeze(1).expand(n, self.count, part.shape[1]).reshape(n, -1) for part in parts], 1)

    def columns(self, rows: Tensor) -> Tensor:
        """(N, n, k) from products in the flat layout (k, total): per instance, column j = row j."""
        k = rows.shape[0]
        sizes = [self.count * int(torch.Size(s).numel()) for s in self.shapes]
        parts = torch.split(rows, sizes, 1)
        per = torch.cat([part.reshape(k, self.count, -1) for part in parts], 2)  # (k, N, n)
        return per.permute(1, 2, 0)


@dataclass(frozen=True)
class LowerQP:
    """The QP of the lower level at x (batched over instances), and where it was read."""

    Q: Tensor
    q: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    inequality: tuple[int, ...]
    """Indices of the level's constraints that are inequalities (in the order of G's rows)."""
    equality: tuple[int, ...]


def _rows(values: Tensor, y: Params, layout: InstanceLayout) -> Tensor:
    """(N, m, n): the Jacobian of per-instance constraint values (N, m) with respect to y."""
    m = values.shape[1]
    if m == 0:
        return values.new_zeros(layout.count, 0, layout.size)
    seeds = torch.eye(m, dtype=values.dtype, device=values.device).unsqueeze(1).expand(m, layout.count, m)
    grads = torch.autograd.grad(values, y, seeds, retain_graph=True, is_grads_batched=True, allow_unused=True)
    grads = [torch.zeros(m, *p.shape, dtype=p.dtype, device=p.device) if g is None else g for g, p in zip(grads, y)]
    return torch.cat([g.reshape(m, layout.count, -1) for g in grads], 2).permute(1, 0, 2)


def constraint_groups(problem: Problem, x: Params, y: Params, batch: Any, layout: InstanceLayout,
                      groups: tuple[tuple[int, ...], ...], rows: bool = True) -> list[tuple[Tensor, Tensor | None]]:
    """For each group of the level's constraints (by index), per instance, their values (N, m) at
    (x, y) and, with ``rows``, their rows (N, m, n); every constraint function evaluated once."""
    leaves = tuple(p.detach().requires_grad_(rows) for p in y)
    out: list[tuple[Tensor, Tensor | None]] = []
    with torch.enable_grad() if rows else torch.no_grad():
        values = problem.constraint_values(x, leaves, batch)
        for which in groups:
            chosen = [values[i].reshape(layout.count, -1) for i in which]
            stacked = torch.cat(chosen, 1) if chosen else leaves[0].new_zeros(layout.count, 0)
            if not rows:
                out.append((stacked.detach(), None))
                continue
            matrix = _rows(stacked, leaves, layout) if chosen else stacked.new_zeros(layout.count, 0, layout.size)
            out.append((stacked.detach(), matrix.detach()))
    return out


def read_qp(problem: Problem, x: Params, y: Params, batch: Any, layout: InstanceLayout, check: bool = False) -> LowerQP:
    """The lower QP at (x, y) (see the module docstring); ``check``: verify that the objective is
    quadratic and the constraints affine, raising a SpecError that names them otherwise."""
    stacked = problem.lower.stacked
    lin = Linearization(lambda xx, yy: problem.lower_objective(xx, yy, batch), x, y)
    grad = layout.flat(tuple(g.detach() for g in lin.grad_y))
    Q = layout.columns(lin.hvp_batched(layout.basis(grad, stacked)))
    Q = 0.5 * (Q + Q.transpose(1, 2))
    flat_y = layout.flat(tuple(p.detach() for p in y))
    q = grad - (Q @ flat_y.unsqueeze(-1)).squeeze(-1)
    constraints = problem.lower.constraints
    inequality = tuple(i for i, c in enumerate(constraints) if not c.is_equality)
    equality = tuple(i for i, c in enumerate(constraints) if c.is_equality)
    (c_val, G), (e_val, A) = constraint_groups(problem, x, y, batch, layout, (inequality, equality))
    h = (G @ flat_y.unsqueeze(-1)).squeeze(-1) - c_val
    b = (A @ flat_y.unsqueeze(-1)).squeeze(-1) - e_val
    if check:
        _check_quadratic(problem, x, flat_y, batch, layout, Q, grad, (G, c_val, inequality), (A, e_val, equality))
    return LowerQP(Q, q, G, h, A, b, inequality, equality)


def _check_quadratic(problem: Problem, x: Params, flat_y: Tensor, batch: Any, layout: InstanceLayout, Q: Tensor,
                     grad: Tensor, *constraint_sets: tuple[Tensor, Tensor, tuple[int, ...]]) -> None:
    """The quadratic model must predict the gradient (and the affine model the constraints) at a
    second point: a deterministic direction of the variables' own scale."""
    stacked = problem.lower.stacked
    gen = torch.Generator(device="cpu").manual_seed(0)
    d = torch.randn(flat_y.shape, generator=gen, dtype=flat_y.dtype).to(flat_y.device) * (1 + flat_y.abs().amax())
    other = layout.unflat(flat_y + d, stacked)
    tol = float(torch.finfo(flat_y.dtype).eps) ** 0.5
    source = problem.source
    lower = problem.lower.name
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in other)
        value = problem.lower_objective(x, leaves, batch)
        moved = torch.autograd.grad(value, leaves, allow_unused=True)
    moved_flat = layout.flat(zeros_for_none(moved, leaves))
    predicted = grad + (Q @ d.unsqueeze(-1)).squeeze(-1)
    scale = 1 + predicted.abs().amax()
    if not bool(((moved_flat - predicted).abs().amax() <= tol * scale)):
        raise SpecError([source.issue(f"levels.{lower}.objective", "the qp engine needs a lower objective quadratic in"
                                      " the lower variables (its gradient moved other than a quadratic's between two"
                                      " points); use lv_hba or a first-order engine for a general one")])
    groups = tuple(which for _, _, which in constraint_sets)
    moved_values = constraint_groups(problem, x, other, batch, layout, groups, rows=False)
    for (rows, values, which), (now, _) in zip(constraint_sets, moved_values):
        if not which:
            continue
        predicted = values + (rows @ d.unsqueeze(-1)).squeeze(-1)
        if not bool(((now - predicted).abs().amax() <= tol * (1 + predicted.abs().amax()))):
            paths = ", ".join(problem.lower.constraints[i].path for i in which)
            raise SpecError([source.issue(paths.split(", ")[0], "the qp engine needs constraints affine in the lower"
                                          f" variables; not affine among: {paths}")])
