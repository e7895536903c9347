"""Inner solvers that minimize a smooth lower objective with curvature: L-BFGS and Newton-CG,
with the stop on the inner residual ||grad_y G|| <= tol that every inner solver shares.

Numerical kernels on tuples of tensors, apart from the problem: they take the objective as
callables (``bilevel.engines.inner`` adapts a Problem to them), reuse the one Hessian-vector
product and the one CG of ``bilevel.linalg``, and keep their loops free of host synchronization
(every decision a ``torch.where``), except the documented early exit of an eager loop.

* :func:`~bilevel.minimize.lbfgs.lbfgs`: Nocedal & Wright 2006, Algorithm 7.5;
* :func:`~bilevel.minimize.newton_cg.newton_cg`: Nocedal & Wright 2006, Algorithm 7.1;
* :class:`~bilevel.minimize.stopping.ResidualStop`, :func:`~bilevel.minimize.stopping.armijo`."""

from __future__ import annotations

from bilevel.minimize.lbfgs import lbfgs
from bilevel.minimize.newton_cg import newton_cg
from bilevel.minimize.result import Minimized
from bilevel.minimize.stopping import ResidualStop, armijo

__all__ = ["Minimized", "ResidualStop", "armijo", "lbfgs", "newton_cg"]
