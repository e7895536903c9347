"""The dominant eigenvalue of a symmetric operator known only through matrix-vector products.

Power iteration (von Mises 1929): v_{k+1} = A v_k / ||A v_k||; the Rayleigh quotient
lambda_k = <v_k, A v_k> (v_k of unit norm) converges to the eigenvalue of largest magnitude at the
rate |lambda_2 / lambda_1|^k. Used with Hessian-vector products, e.g. for the curvature of the
validation loss in the architecture (DARTS-ES, Zela et al. 2020). No host synchronization: the
iterations run a fixed number of times on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from bilevel.linalg.tree import tree_dot, tree_norm, tree_scale

__all__ = ["power_iteration"]


def power_iteration(
    matvec: Callable[[tuple[Tensor, ...]], Sequence[Tensor]], start: Sequence[Tensor], iters: int
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(lambda, v): the Rayleigh quotient <v, A v> of the last unit iterate v before the final
    normalization, and the normalized A v (the next iterate, to warm-start a later call)."""
    v = tree_scale(1.0 / tree_norm(start).clamp_min(1e-30), start)
    eigenvalue = tree_dot(v, v) * 0
    for _ in range(iters):
        product = tuple(matvec(v))
        eigenvalue = tree_dot(v, product)
        v = tree_scale(1.0 / tree_norm(product).clamp_min(1e-30), product)
    return eigenvalue, v
