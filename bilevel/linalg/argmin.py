"""The solution of an inner problem as a differentiable function of its parameters, to any order.

For y*(x) = argmin_y phi(x, y) with H = grad^2_yy phi(x, y*) positive definite, the implicit
function theorem gives the vector-Jacobian product of the solution map (Pedregosa 2016; Blondel
et al. 2022, "Efficient and Modular Implicit Differentiation", NeurIPS):

    x_bar = (dy*/dx)^T y_bar = -(grad^2_xy phi)^T lam,        H lam = y_bar,

one linear solve on Hessian-vector products. ``argmin(phi, x, y_star, solve)`` returns y_star
attached to x through an autograd node whose backward is exactly that. So any function of x
built from such nodes is differentiated by autograd, solve by solve.

**Higher order.** A level in the middle of a chain minimizes phi(x, y) = G(x, y, z*(x, y)),
whose gradient in y already contains one implicit derivative (through z*); its Hessian-vector
products differentiate that gradient again. When the backward above is itself differentiated
(autograd's create_graph), lam must be a differentiable function of (x, y*, y_bar). It is one:
lam is the minimizer of the quadratic

    psi((x, y*, y_bar), lam) = 1/2 <lam, H(x, y*) lam> - <y_bar, lam>,

whose Hessian in lam is H again, so lam = argmin(psi, (x, y*, y_bar), lam): the same node, one
order down. The products of psi are third derivatives of phi, taken through the shared
Hessian-vector product with ``create_graph`` (bilevel/linalg/hvp.py); no Hessian is ever formed.
Each level of nesting multiplies the cost by the iterations of one linear solve, and nothing else
is approximated: with converged solves the derivatives are exact.

The node is only valid at the point where y_star was computed: it does not re-solve when x
moves. It serves one hypergradient, evaluated at that point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg.hvp import Linearization
from bilevel.linalg.solve import LinearSolver
from bilevel.linalg.tree import tree_dot, tree_norm

__all__ = ["SolveLog", "argmin"]

Params = tuple[Tensor, ...]
Objective = Callable[[Params, Params], Tensor]


@dataclass
class SolveLog:
    """What the implicit derivatives of one hypergradient cost and how well their pieces
    converged: Hessian-vector products spent, each linear solve's relative residual, and the
    gradient norm ||grad_y phi|| of each named level at the point where it was linearized."""

    matvecs: int = 0
    residuals: list[Tensor] = field(default_factory=list)
    gradient_norms: dict[str, Tensor] = field(default_factory=dict)

    def worst_residual(self) -> Tensor | None:
        """The largest relative residual of the linear solves (None when nothing was solved)."""
        return torch.stack(self.residuals).max() if self.residuals else None


class _Argmin(torch.autograd.Function):
    """Identity on y_star in the forward pass; the implicit function theorem in the backward."""

    @staticmethod
    def forward(ctx: Any, phi: Objective, solve: LinearSolver, log: SolveLog | None, name: str | None,
                n_x: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        x, y = tensors[:n_x], tensors[n_x:]
        ctx.phi, ctx.solve, ctx.log, ctx.name, ctx.n_x = phi, solve, log, name, n_x
        out = tuple(p.detach().clone() for p in y)
        ctx.save_for_backward(*x, *out)  # outputs are saved so that y* stays a function of x when differentiated again
        return out

    @staticmethod
    def backward(ctx: Any, *y_bar: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        x, y = saved[: ctx.n_x], saved[ctx.n_x :]
        differentiable = torch.is_grad_enabled()  # the caller asked for create_graph
        with torch.enable_grad():
            lin = Linearization(ctx.phi, x, y)
            result = ctx.solve(lin, tuple(g.detach() for g in y_bar), None)
            if ctx.log is not None:
                ctx.log.matvecs += result.matvecs
                ctx.log.residuals.append(result.residual.detach())
                if ctx.name is not None:
                    ctx.log.gradient_norms[ctx.name] = tree_norm(lin.grad_y).detach()
            if differentiable:
                params = (*x, *y, *y_bar)
                lam = argmin(_adjoint_objective(ctx.phi, len(x), len(y)), params, result.solution, ctx.solve, ctx.log)
                grad_x = Linearization(ctx.phi, x, y, create_graph=True).vjp_x(lam)
            else:
                grad_x = lin.vjp_x(result.solution)
        return (None, None, None, None, None, *(-g for g in grad_x), *(None for _ in y))


def _adjoint_objective(phi: Objective, n_x: int, n_y: int) -> Objective:
    """psi((x, y, y_bar), lam) = 1/2 <lam, H(x, y) lam> - <y_bar, lam>: minimized by H^{-1} y_bar."""

    def psi(params: Params, lam: Params) -> Tensor:
        x, y, y_bar = params[:n_x], params[n_x : n_x + n_y], params[n_x + n_y :]
        h_lam = Linearization(phi, x, y, create_graph=True).hvp(lam)
        return 0.5 * tree_dot(lam, h_lam) - tree_dot(y_bar, lam)

    return psi


def argmin(
    phi: Objective,
    x: Sequence[Tensor],
    y_star: Sequence[Tensor],
    solve: LinearSolver,
    log: SolveLog | None = None,
    name: str | None = None,
) -> Params:
    """y_star (a minimizer of phi(x, .), computed by the caller) as a differentiable function of x.

    ``phi(x, y)`` must be a scalar on fixed data; ``solve`` is the linear solver for its Hessian
    in y (``make_linear_solver``); ``log`` collects costs and residuals, with ``name`` labelling
    the gradient norm recorded at this solution."""
    return _Argmin.apply(phi, solve, log, name, len(x), *x, *y_star)
