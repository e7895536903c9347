"""Engine configurations in a spec: ``{kind: auto}`` (the planner chooses) or one registered
engine's own Config, a discriminated union on ``kind`` built from the engine registry
(``bilevel.engines.registry``); and the linear solver that engines on Hessian-vector products share."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from bilevel.spec._base import SpecModel

__all__ = ["AutoEngine", "EngineConfig", "LinearSolverSpec"]


class EngineConfig(SpecModel):
    """Base of every engine's Config: a spec model whose ``kind`` is a literal naming the engine."""

    kind: str
    """Discriminator: the engine's registered kind."""


class LinearSolverSpec(SpecModel):
    """Solver for H v = b with H = grad^2_yy G, accessed only through Hessian-vector products."""

    method: Literal["cg", "neumann", "direct"] = "cg"
    """cg: conjugate gradient (H must be positive definite); neumann: truncated Neumann series
    eta sum_j (I - eta H)^j b (needs eta < 2 / L); direct: dense solve of H assembled from
    HVPs on the basis (small problems only)."""
    maxiter: Annotated[int, Field(ge=1)] = 20
    """Iterations (CG steps or Neumann terms). Runs exactly this many unless converged on device."""
    tol: Annotated[float, Field(ge=0)] = 1e-10
    """Stop updating once ||H v - b|| <= tol * ||b|| (checked on the device, no host sync)."""
    ridge: Annotated[float, Field(ge=0)] = 0.0
    """Solve (H + ridge I) v = b instead; regularizes an ill-conditioned or singular H."""
    neumann_lr: Annotated[float, Field(gt=0)] | None = None
    """Neumann step eta; None uses the inner solver's learning rate."""
    max_direct_size: Annotated[int, Field(ge=1)] = 4096
    """Largest number of lower-level scalars for which the direct solve is allowed."""
    warm_start: bool = True
    """Start each linear solve from the previous solution v."""


class AutoEngine(EngineConfig):
    """Let the planner choose the engine from the declared facts and the budget."""

    kind: Literal["auto"] = "auto"
    """Discriminator: planner's choice."""
