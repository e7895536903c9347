"""Engine configurations: "auto" or one named engine with its own options (a discriminated union)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from bilevel.spec._base import SpecModel
from bilevel.spec.fastpath import FastPathMode, PrecisionSpec

__all__ = [
    "AutoEngine",
    "BORepConfig",
    "DartsConfig",
    "EngineSpec",
    "ImplicitConfig",
    "LVHBAConfig",
    "LinearSolverSpec",
    "PenaltyConfig",
    "RartsConfig",
    "StnConfig",
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


class DartsConfig(SpecModel):
    """DARTS (Liu et al. 2019): per outer step, ``steps`` warm-started steps of the lower solver on
    the weights w, then the architecture direction

        order 1:  grad_alpha L_val(w, alpha)
        order 2:  grad_alpha L_val(w', alpha) - xi grad^2_{alpha,w} L_train(w, alpha) grad_w' L_val(w', alpha),

    w' = one virtual step of the lower solver from w (momentum and weight decay included). The
    mixed product is a central finite difference (as the paper) or exact (one mixed VJP)."""

    kind: Literal["darts"] = "darts"
    """Discriminator: the DARTS engine."""
    order: Literal[1, 2] = 2
    """1: first-order DARTS (w' = w); 2: second order, with the virtual step."""
    hessian: Literal["finite_difference", "exact"] = "finite_difference"
    """Order 2: the mixed product by central differences of grad_alpha L_train at w +- eps v,
    eps = fd_radius / ||v|| (DARTS), or exactly by one mixed vector-Jacobian product."""
    fd_radius: Annotated[float, Field(gt=0)] = 0.01
    """r in eps = r / ||grad_w' L_val|| (DARTS: 0.01)."""
    xi: Annotated[float, Field(gt=0)] | None = None
    """Virtual step size; None: the lower solver's learning rate (as the DARTS code)."""
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    """Weight steps before the first architecture step (in the first outer step), so that the
    parametric operations are trained before the architecture judges them (PC-DARTS warms up for
    15 of 50 epochs). None: the architecture variable's warmup_steps (0 without one)."""
    eigen_every: Annotated[int, Field(ge=1)] | None = None
    """Estimate the dominant eigenvalue of grad^2_alpha L_val (power iteration on Hessian-vector
    products) every N outer steps, logged as ``eigenvalue``; None: never."""
    eigen_iters: Annotated[int, Field(ge=1)] = 20
    """Power-iteration steps per estimate (warm-started from the previous eigenvector)."""
    early_stop_ratio: Annotated[float, Field(gt=0, lt=1)] | None = None
    """DARTS-ES (Zela et al. 2020): stop when mean(eigenvalues of the window ``lookback`` estimates
    ago) / mean(eigenvalues of the current window) falls below this ratio (paper: 0.75), and end
    with the architecture of ``lookback`` estimates ago. None: no early stop. Needs eigen_every."""
    eigen_window: Annotated[int, Field(ge=1)] = 5
    """Estimates averaged on each side of the early-stopping comparison."""
    eigen_lookback: Annotated[int, Field(ge=1)] = 5
    """k: the comparison is with the window k estimates earlier, whose architecture is restored."""

    @model_validator(mode="after")
    def _early_stop_needs_estimates(self) -> "DartsConfig":
        if self.early_stop_ratio is not None and self.eigen_every is None:
            raise ValueError("early_stop_ratio needs eigen_every (how often the eigenvalue is estimated)")
        return self


class RartsConfig(SpecModel):
    """RARTS (Xue, Qi & Xin 2021, "RARTS: An Efficient First-Order Relaxed Architecture Search
    Method"): network splitting with a second copy y of the weights, trained on validation data,
    and Gauss-Seidel steps on the relaxed single-level objective

        L(w, y, alpha) = L_val(y, alpha) + lam L_train(w, alpha) + beta/2 ||y - w||^2

    (w, then y, then alpha); first order, no mixed second derivatives."""

    kind: Literal["rarts"] = "rarts"
    """Discriminator: the RARTS engine."""
    lam: Annotated[float, Field(gt=0)] = 1.0
    """lambda: weight of the training loss."""
    beta: Annotated[float, Field(gt=0)] = 10.0
    """beta: coupling of the two weight copies. The fixed point is biased by about
    (1/beta + 1/(2 lam)) / 2 on the analytic toy, so a coupling well above 1 is needed (the step
    sizes must stay below about 1 / (lam + beta))."""
    y_lr: Annotated[float, Field(gt=0)] | None = None
    """Step size of y (same optimizer kind as the lower solver); None: the lower solver's lr."""
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    """Steps of the lower solver on L_train alone before the first architecture step (in the first
    outer step); y then starts as a copy of the warmed-up w. None: the architecture variable's
    warmup_steps (0 without one)."""


class StnConfig(SpecModel):
    """Self-Tuning Networks (MacKay et al. 2019): the lower model is a best-response approximation
    w_phi(lam) built from STN layers; each outer step trains phi for ``steps`` of the lower solver on
    the training loss at hyperparameters drawn around the current ones, then steps (lam, sigma) on
    the validation loss through w_phi minus tau times the entropy of the perturbation."""

    kind: Literal["stn"] = "stn"
    """Discriminator: the STN engine."""
    val_steps: Annotated[int, Field(ge=1)] = 1
    """T_val: hyperparameter steps per cycle. The lower solver's ``steps`` are T_train, taken
    before the first of every T_val outer steps (paper: T_train = 2, T_val = 1)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Training steps of phi (with perturbed hyperparameters) before the first hyperparameter step
    (the paper warms up for 5 epochs)."""
    perturbation_scale: Annotated[float, Field(gt=0)] = 0.25
    """Initial sigma, the standard deviation of the perturbation in raw (unconstrained) units
    (paper: 0.5). A smaller start trains the model at less noisy settings and lets the draws of a
    discrete hyperparameter settle on one value (docs/engines/stn.md)."""
    learn_scale: bool = True
    """Learn sigma on the validation objective (else keep it fixed)."""
    scale_lr: Annotated[float, Field(gt=0)] = 3e-3
    """Adam step size for s, sigma = softplus(s) (paper: 3e-3, as for the hyperparameters)."""
    entropy_weight: Annotated[float, Field(ge=0)] = 1e-3
    """tau: weight of the perturbation's entropy, which keeps sigma from collapsing (paper: 1e-3 to 1e-5)."""
    discrete_estimator: Literal["reinforce", "straight_through"] = "reinforce"
    """Gradient for discrete hyperparameters. reinforce: score function with a moving-average
    baseline, unbiased whatever the objectives do with the value; straight_through: the model's
    conditioning sees the discrete value, its gradient that of the continuous latent (integer) or
    of a Gumbel-softmax relaxation (categorical): lower variance, but blind to a direct use of the
    value in the validation objective."""
    baseline_decay: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """REINFORCE baseline b <- decay b + (1 - decay) F."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Gumbel-softmax temperature of straight_through for categorical hyperparameters."""
    per_example: list[str] = Field(default_factory=list)
    """Continuous scalar hyperparameters drawn once per example of a batch instead of once per step
    (the reference code's minibatched perturbation), e.g. dropout rates: each example then trains
    the response at its own setting, which separates the effects of hyperparameters a per-step
    draw moves together. Under STN their objectives receive a (batch,) tensor (use it per example:
    bilevel.stn.dropout does) and hyper_input(upper) a (batch, n_hyper) matrix; the batch is the
    level's minibatch (its whole data set without batch_size)."""


class AutoEngine(SpecModel):
    """Let the planner choose the engine from the declared facts and the budget."""

    kind: Literal["auto"] = "auto"
    """Discriminator: planner's choice."""


EngineSpec = Annotated[
    Union[
        AutoEngine, ImplicitConfig, UnrolledConfig, PenaltyConfig, BORepConfig, LVHBAConfig, DartsConfig, RartsConfig, StnConfig
    ],
    Field(discriminator="kind"),
]
