"""Engine configurations: "auto" or one named engine with its own options (a discriminated union)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from bilevel.spec._base import SpecModel
from bilevel.spec.fastpath import FastPathMode, PrecisionSpec

__all__ = [
    "AutoEngine",
    "BORepConfig",
    "EngineSpec",
    "ImplicitConfig",
    "LVHBAConfig",
    "LinearSolverSpec",
    "PenaltyConfig",
    "UnrolledConfig",
]


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
    fast_path: FastPathMode = "auto"
    """How the hypergradient is executed (the result is the same): auto picks per device (CUDA:
    one CUDA graph of the whole hypergradient; CPU: eager); off: eager; cuda_graph: capture the
    whole hypergradient in a CUDA graph and replay it; compile: the first-order inner loop through
    torch.compile (also captured on CUDA). Falls back to eager, saying why once, where it cannot
    apply (see docs/fastpath.md)."""
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    """Reduced precision (TF32, bf16) for the inner solve and Hessian-vector products, checked
    against full precision."""


class UnrolledConfig(SpecModel):
    """Reverse-mode differentiation through the inner optimizer's iterations (RHG / T-RHG)."""

    kind: Literal["unrolled"] = "unrolled"
    """Discriminator: the unrolled engine."""
    truncate: Annotated[int, Field(ge=1)] | None = None
    """Differentiate through the last K inner steps only (T-RHG); None: through all of them."""
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    """Store every k-th inner state and recompute the others during the backward pass:
    memory O(T/k + k) states instead of O(T). None: store every state."""
    fast_path: FastPathMode = "auto"
    """How the hypergradient is executed (the result is the same): auto picks per device (CUDA:
    one CUDA graph of the whole hypergradient; CPU: eager); off: eager; cuda_graph: capture the
    whole hypergradient in a CUDA graph and replay it; compile: the first-order inner loop through
    torch.compile (also captured on CUDA). Falls back to eager, saying why once, where it cannot
    apply (see docs/fastpath.md)."""
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    """Reduced precision (TF32, bf16) for the inner solve and Hessian-vector products, checked
    against full precision."""


class PenaltyConfig(SpecModel):
    """Value-function penalty (V-PBGD; Shen & Chen 2023, Kwon et al. 2024): first order, no HVPs.

    Per step: omega takes ``omega_steps`` warm-started GD steps on G(x, .); then (x, y) step on
    min(1/gamma, 1) [F(x, y) + gamma (G(x, y) - G(x, omega))], gamma ramped linearly."""

    kind: Literal["penalty"] = "penalty"
    """Discriminator: the penalty engine."""
    gamma_init: Annotated[float, Field(ge=0)] = 0.0
    """Penalty weight at step 0."""
    gamma_max: Annotated[float, Field(gt=0)] = 10.0
    """Penalty weight reached after ``gamma_ramp_steps`` (kept after). The bias of the solution
    is O(1/gamma); the steps it needs grow like O(gamma)."""
    gamma_ramp_steps: Annotated[int, Field(ge=0)] = 0
    """Outer steps of the linear ramp from gamma_init to gamma_max (0: gamma_max from the start)."""
    lower_lr: Annotated[float, Field(gt=0)] | None = None
    """Step of y on the penalized objective; None: the lower solver's lr."""
    omega_lr: Annotated[float, Field(gt=0)] | None = None
    """Step of the value-function variable omega on G(x, .); None: the lower solver's lr."""
    omega_steps: Annotated[int, Field(ge=1)] = 1
    """GD steps of omega per outer step (warm-started; T = 1 in V-PBGD)."""
    scale: bool = True
    """Multiply the penalized gradient by min(1/gamma, 1), as V-PBGD does, so that step sizes
    need not shrink by hand as gamma grows."""


class BORepConfig(SpecModel):
    """BO-REP (Hao et al. 2024, "Bilevel Optimization under Unbounded Smoothness"): periodic
    lower updates with initialization refinement, a linear-system variable z updated by one
    HVP step per iteration, and (with the upper solver normalized_momentum) normalized momentum."""

    kind: Literal["bo_rep"] = "bo_rep"
    """Discriminator: the BO-REP engine."""
    update_every: Annotated[int, Field(ge=1)] = 2
    """I: update the lower variable every I outer steps."""
    lower_steps: Annotated[int, Field(ge=1)] = 10
    """N: lower SGD steps at each periodic update (the lower solver's lr)."""
    refine_steps: Annotated[int, Field(ge=0)] | None = None
    """Initialization refinement: lower steps before the first outer step; None: the lower
    solver's ``steps``."""
    z_lr: Annotated[float, Field(gt=0)] = 0.01
    """nu: step of z <- z - nu (H z - grad_y F)."""


class LVHBAConfig(SpecModel):
    """LV-HBA (Yao et al. 2024): proximal Lagrangian value function, single loop, Hessian-free;
    lower levels with (coupled) functional constraints."""

    kind: Literal["lv_hba"] = "lv_hba"
    """Discriminator: the LV-HBA engine."""
    gamma1: Annotated[float, Field(gt=0)] = 10.0
    """Proximal weight on theta - y."""
    gamma2: Annotated[float, Field(gt=0)] = 10.0
    """Proximal weight on lambda - z."""
    eta: Annotated[float, Field(gt=0)] = 0.03
    """Step of the projected descent-ascent on (theta, lambda)."""
    lower_lr: Annotated[float, Field(gt=0)] = 0.005
    """alpha for y (give the upper level the same step: solver {name: sgd, lr: alpha})."""
    z_lr: Annotated[float, Field(gt=0)] = 0.002
    """beta: step of z <- Proj_Z(z + beta (lambda - z) / gamma2)."""
    c0: Annotated[float, Field(gt=0)] = 1.0
    """c_k = c0 (k + 1)^p weighs the upper objective by 1 / c_k."""
    p: Annotated[float, Field(ge=0, lt=0.5)] = 0.3
    """Growth exponent of c_k."""
    multiplier_bound: Annotated[float, Field(gt=0)] = 1.0
    """Box for the multipliers: [0, B] for inequalities, [-B, B] for equalities."""


class AutoEngine(SpecModel):
    """Let the planner choose the engine from the declared facts and the budget."""

    kind: Literal["auto"] = "auto"
    """Discriminator: planner's choice."""


EngineSpec = Annotated[
    Union[AutoEngine, ImplicitConfig, UnrolledConfig, PenaltyConfig, BORepConfig, LVHBAConfig],
    Field(discriminator="kind"),
]
