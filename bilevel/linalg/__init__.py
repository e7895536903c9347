"""Linear algebra on Hessian-vector products: one HVP/mixed VJP, CG, Neumann and direct solves."""

from __future__ import annotations

from bilevel.linalg.cg import cg
from bilevel.linalg.direct import direct
from bilevel.linalg.eigen import power_iteration
from bilevel.linalg.hvp import Linearization, grad_and_value, joint_grad
from bilevel.linalg.neumann import neumann
from bilevel.linalg.result import SolveResult
from bilevel.linalg.solve import LinearSolver, make_linear_solver

__all__ = ["Linearization", "LinearSolver", "SolveResult", "cg", "direct", "grad_and_value", "joint_grad", "make_linear_solver", "neumann", "power_iteration"]
