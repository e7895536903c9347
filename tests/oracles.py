"""Closed-form oracles the engine tests compare against, in one place (float64):

* the strongly convex quadratic (problems/toy): dF/dx, and x* = argmin_x F(x, y*(x));
* ridge regression with learned L2 strengths (problems/toy): dF/dlam;
* the three-level quadratic chain (problems/toy/three_level.py): b*, c*, dF/da, a*;
* the lasso and the elastic net with their strengths upstairs (problems/sparse_hpo): the solution,
  its active set and dF/dl1, dF/dl2 on it;
* the fixed points of the alternating architecture engines: DARTS on the quadratic (first order:
  grad_x F(x, y*(x)) = 0; second order with virtual step xi: A^{-1} replaced by xi I), RARTS on
  the DARTS analytic toy (problems/nas/toy.py)."""

from __future__ import annotations

import functools

import torch

from problems.nas.toy import rarts_fixed_point
from problems.sparse_hpo import LassoSolution, lasso_hypergrad, regression_data
from problems.toy import quadratic_data, quadratic_hypergrad, ridge_data, ridge_hypergrad, ridge_val_data
from problems.toy.three_level import three_level_closed_form

__all__ = [
    "darts_fixed_point_on_the_quadratic",
    "lasso_closed_form",
    "quadratic_data",
    "quadratic_hypergrad",
    "quadratic_solution",
    "rarts_fixed_point",
    "rel_error",
    "ridge_data",
    "ridge_hypergrad",
    "ridge_val_data",
    "three_level_closed_form",
]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


@functools.lru_cache(maxsize=None)
def lasso_closed_form(l1: float, l2: float = 0.0, **data: int) -> LassoSolution:
    """The lasso (l2 = 0) / elastic net on problems.sparse_hpo's regression data: the solution, its
    active set, the complementarity margin and dF/dl1, dF/dl2 (cached: every check shares it)."""
    return lasso_hypergrad(l1, l2, regression_data("train", **data), regression_data("val", **data))


def quadratic_solution(rho: float = 0.1) -> torch.Tensor:
    """x* of the quadratic toy: the hypergradient rho x + M^T (M x - c) = 0 with M = A^{-1} B."""
    data = quadratic_data()
    M = torch.linalg.solve(data["A"], data["B"])
    return torch.linalg.solve(M.T @ M + rho * torch.eye(M.shape[1], dtype=M.dtype), M.T @ data["c"])


def darts_fixed_point_on_the_quadratic(order: int, xi: float = 0.09, rho: float = 0.1) -> torch.Tensor:
    """Where DARTS comes to rest on the quadratic: first order, grad_x F(x, y*(x)) = rho x = 0;
    second order (sgd virtual step xi), rho x + xi B^T (y*(x) - c) = 0."""
    data = quadratic_data()
    B, c = data["B"], data["c"]
    if order == 1:
        return torch.zeros(B.shape[1], dtype=B.dtype)
    M = rho * torch.eye(B.shape[1], dtype=B.dtype) + xi * B.T @ torch.linalg.solve(data["A"], B)
    return torch.linalg.solve(M, xi * B.T @ c)
