"""Implicit differentiation of a fixed point y = T(x, y) of a projected or proximal gradient step

    T(x, y) = P(x, y - eta grad_y G(x, y)),

P the proximal operators and projections a lower level declares (the identity elsewhere). At a
solution of min_y G(x, y) + g(x, y) (g convex: prox terms, the indicators of sets) y* = T(x, y*)
for every eta > 0, and where I - d_yT is invertible the implicit function theorem applied to
y - T(x, y) = 0 gives (Blondel et al. 2022, "Efficient and Modular Implicit Differentiation",
NeurIPS, section 2.1 and its proximal-gradient and projected-gradient fixed points; Bertrand et
al. 2020 and Mehmood & Ochs 2020 for the lasso)

    dy*/dx = (I - d_yT)^{-1} d_xT,        dF/dx = grad_x F + (d_xT)^T w,   (I - d_yT)^T w = grad_y F.

With z = y - eta grad_y G and D = d_zP (the Jacobian of the prox / projection at z):

    d_yT = D (I - eta H),        d_xT = d_xP - eta D J,        H = grad^2_yy G,  J = grad^2_xy G,

so every product is one of P's (reverse mode, through a graph of P built once) combined with
the shared Hessian-vector and mixed products of ``Linearization``. Where P is the identity this
is the smooth case exactly: eta H w = grad_y F, and (d_xT)^T w = -J^T H^{-1} grad_y F.

**Active constraints.** For a box, D is 1 on free entries and 0 on entries held at a bound; for
soft thresholding, 1 on the nonzero entries (the active set) and 0 on the zeroed ones. The zeroed
rows of I - d_yT are the identity, so the system reduces to eta H_AA w_A = (grad_y F)_A on the
active set A: the derivative of the solution is that of the smooth problem restricted to the free
entries, and the entries held at 0 (or at a bound) do not move. This needs strict
complementarity (no entry exactly at a kink, |z_i| = eta lam) and H_AA invertible.

The system is not symmetric. The linear solvers (``make_fixed_point_solver``) solve it by CG on
the normal equations (A^T A w = A^T b, as JAXopt's default solve_normal_cg; two products per
iteration), by the Neumann series sum_j (d_yT^T)^j b (T is a contraction for eta < 2/L, D having
norm <= 1), or directly on the assembled matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel.linalg.hvp import Linearization
from bilevel.linalg.tree import tree_norm, zeros_for_none

__all__ = ["FixedPointLinearization"]

Params = tuple[Tensor, ...]
Operator = Callable[[Params, Params], Params]
"""P(x, z): the proximal operators / projections at the fixed step eta."""


class FixedPointLinearization:
    """T(x, y) = P(x, y - eta grad_y G) and its products at a point, for the adjoint system
    (I - d_yT)^T w = b. ``lin`` is G's linearization at (x, y); ``ridge`` adds ridge I to H
    inside T (the regularized system, as for the smooth solve)."""

    def __init__(self, lin: Linearization, operator: Operator, eta: float, ridge: float = 0.0):
        self.lin = lin
        self.eta = float(eta)
        self.ridge = float(ridge)
        y = tuple(p.detach() for p in lin.y)
        self.x = tuple(p.detach().requires_grad_(True) for p in lin.x)
        with torch.enable_grad():
            self.z = tuple((p - self.eta * g.detach()).requires_grad_(True) for p, g in zip(y, lin.grad_y))
            self._out = tuple(operator(self.x, self.z))
        self.value: Params = tuple(t.detach() for t in self._out)
        """T(x, y)."""
        self.residual: Tensor = tree_norm(tuple((a - b) / self.eta for a, b in zip(y, self.value))).detach()
        """||y - T(x, y)|| / eta: the fixed-point (projected / proximal gradient) residual."""
        self._graph = any(t.requires_grad for t in self._out)

    # --- P's products --------------------------------------------------------------------------
    def _p_vjp(self, w: Sequence[Tensor], inputs: Params, create_graph: bool = False) -> Params:
        if not self._graph:  # P ignores its inputs (every entry held at a constant bound)
            return tuple(torch.zeros_like(p) for p in inputs)
        outputs = [o for o in self._out if o.requires_grad]
        cotangents = [c for o, c in zip(self._out, w) if o.requires_grad]
        grads = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, create_graph=create_graph, allow_unused=True)
        return zeros_for_none(grads, inputs)

    def _p_jvp(self, v: Sequence[Tensor]) -> Params:
        """D v, as the derivative of the linear map w -> D^T w (the VJP) in w: v -> <D^T w, v>."""
        with torch.enable_grad():
            w = tuple(torch.zeros_like(o).requires_grad_(True) for o in self._out)
            pulled = self._p_vjp(w, self.z, create_graph=True)
            total = sum(((p * t).sum() for p, t in zip(pulled, v) if p.requires_grad), torch.zeros((), dtype=v[0].dtype, device=v[0].device))
            if not total.requires_grad:
                return tuple(torch.zeros_like(o) for o in self._out)
            return zeros_for_none(torch.autograd.grad(total, w, allow_unused=True), self._out)

    def _h(self, v: Sequence[Tensor]) -> Params:
        hv = self.lin.hvp(tuple(v))
        return hv if self.ridge == 0.0 else tuple(h + self.ridge * u for h, u in zip(hv, v))

    # --- T's products --------------------------------------------------------------------------
    def vjp_y(self, w: Sequence[Tensor]) -> Params:
        """(d_yT)^T w = (I - eta H) D^T w."""
        pulled = self._p_vjp(w, self.z)
        return tuple(p - self.eta * h for p, h in zip(pulled, self._h(pulled)))

    def jvp_y(self, v: Sequence[Tensor]) -> Params:
        """d_yT v = D (I - eta H) v."""
        return self._p_jvp(tuple(u - self.eta * h for u, h in zip(v, self._h(v))))

    def vjp_x(self, w: Sequence[Tensor]) -> Params:
        """(d_xT)^T w = (d_xP)^T w - eta J^T D^T w (the last product: it frees G's graph)."""
        direct = self._p_vjp(w, self.x) if self._graph else tuple(torch.zeros_like(p) for p in self.x)
        mixed = self.lin.vjp_x(self._p_vjp(w, self.z))
        return tuple(a - self.eta * b for a, b in zip(direct, mixed))

    # --- the adjoint system A w = b, A = (I - d_yT)^T --------------------------------------------
    def matvec(self, w: Sequence[Tensor]) -> Params:
        """A w = w - (d_yT)^T w."""
        return tuple(a - b for a, b in zip(w, self.vjp_y(w)))

    def rmatvec(self, v: Sequence[Tensor]) -> Params:
        """A^T v = v - d_yT v."""
        return tuple(a - b for a, b in zip(v, self.jvp_y(v)))

    def matvec_batched(self, basis: Tensor) -> Tensor:
        """Rows A u for a batch of flat vectors ``basis`` (k, n), by batched products: A^T
        assembled (row i is A e_i) for a direct solve."""
        shapes = [p.shape for p in self.z]
        sizes = [p.numel() for p in self.z]
        parts = torch.split(basis, sizes, dim=1)
        ws = tuple(part.reshape(basis.shape[0], *shape) for part, shape in zip(parts, shapes))
        if self._graph:
            outputs = [o for o in self._out if o.requires_grad]
            cotangents = [c for o, c in zip(self._out, ws) if o.requires_grad]
            grads = torch.autograd.grad(outputs, self.z, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True)
            pulled = torch.cat([torch.zeros(basis.shape[0], n, dtype=basis.dtype, device=basis.device) if g is None
                                else g.reshape(basis.shape[0], -1) for g, n in zip(grads, sizes)], dim=1)
        else:
            pulled = torch.zeros_like(basis)
        h = self.lin.hvp_batched(pulled) + self.ridge * pulled
        return basis - (pulled - self.eta * h)
