"""Engine configurations: "auto" or one named engine with its own options (a discriminated union)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from bilevel.spec._base import SpecModel

__all__ = ["AutoEngine", "EngineSpec", "ImplicitConfig", "LinearSolverSpec", "UnrolledConfig"]


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


class ImplicitConfig(SpecModel):
    """Implicit differentiation (IFT): dF/dx = grad_x F - (grad^2_xy G)^T H^{-1} grad_y F."""

    kind: Literal["implicit"] = "implicit"
    """Discriminator: the implicit engine."""
    linear_solver: LinearSolverSpec = Field(default_factory=LinearSolverSpec)
    """How H v = grad_y F is solved."""
    hvp: Literal["reverse", "forward"] = "reverse"
    """reverse: double backward through a graph of grad_y G linearized once per hypergradient;
    forward: forward-over-reverse (torch.func.jvp of torch.func.grad)."""


class UnrolledConfig(SpecModel):
    """Reverse-mode differentiation through the inner optimizer's iterations (RHG / T-RHG)."""

    kind: Literal["unrolled"] = "unrolled"
    """Discriminator: the unrolled engine."""
    truncate: Annotated[int, Field(ge=1)] | None = None
    """Differentiate through the last K inner steps only (T-RHG); None: through all of them."""
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    """Store every k-th inner state and recompute the others during the backward pass:
    memory O(T/k + k) states instead of O(T). None: store every state."""


class AutoEngine(SpecModel):
    """Let the planner choose the engine from the declared facts and the budget."""

    kind: Literal["auto"] = "auto"
    """Discriminator: planner's choice."""


EngineSpec = Annotated[Union[AutoEngine, ImplicitConfig, UnrolledConfig], Field(discriminator="kind")]
