"""The optimizer of a level: a lower level's inner solver (first-order optimizers, L-BFGS,
Newton-CG, or ``auto``: the planner's choice) or the top level's outer optimizer."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from bilevel.spec._base import SpecModel
from bilevel.spec.schedule import TunedSchedule

__all__ = ["FIRST_ORDER", "SECOND_ORDER", "OptimizerSpec"]

FIRST_ORDER = ("sgd", "momentum", "adam")
"""Inner solvers written as one update from a gradient (``bilevel.optim``): what engines that go
through the optimizer's steps differentiate."""
SECOND_ORDER = ("lbfgs", "newton_cg")
"""Inner solvers that minimize the lower objective with curvature and a line search
(``bilevel.minimize``): only their solution is used, never their steps."""


class OptimizerSpec(SpecModel):
    """A level's optimizer: the lower level's inner solver or the upper level's outer optimizer.
    First-order optimizers take ``steps`` updates; lbfgs and newton_cg minimize a strongly convex
    smooth lower objective to the residual ``tol`` (``bilevel.minimize``)."""

    name: Literal["sgd", "momentum", "adam", "normalized_momentum", "lbfgs", "newton_cg", "auto"] = "sgd"
    """sgd: y <- y - lr g; momentum: heavy ball m <- mu m + g, y <- y - lr m; adam: Kingma & Ba 2015;
    normalized_momentum (outer optimizer only; BO-REP): m <- mu m + (1 - mu) g, x <- x - lr m / ||m||.
    Inner solvers only, for engines that use the lower solution alone (implicit): lbfgs, limited-memory
    BFGS with an Armijo line search (Nocedal & Wright 2006, Algorithm 7.5); newton_cg, line-search
    Newton-CG on Hessian-vector products (Nocedal & Wright 2006, Algorithm 7.1); auto, the planner
    chooses from the level's declared assumptions and size, and reads it as sgd (with this lr and
    steps) wherever it keeps a first-order solver (docs/inner-solvers.md). An omitted name is sgd."""
    lr: Annotated[float, Field(gt=0)] = 0.1
    """Step size. lbfgs: the scale of its first step, -lr grad G, before any curvature pair is
    stored; newton_cg: unused (its steps are Newton steps)."""
    steps: Annotated[int, Field(ge=0)] = 100
    """Inner solver: steps per lower solve (with ``tol``: at most this many; lbfgs: iterations, one
    gradient each; newton_cg: Newton iterations). Ignored for the outer optimizer (see run.steps)."""
    tol: Annotated[float, Field(gt=0)] | None = None
    """Inner solver: stop once the inner residual ||grad_y G(x, y)|| <= tol (absolute), instead of
    always taking ``steps``. The iterate is frozen on the device (torch.where) from the first step at
    which the test held, so the solution is the same however often it is read: eagerly, one host
    sync every ``check_every`` steps ends the loop; inside a captured graph (the fast path) the
    loop runs all ``steps`` frozen. Honored by engines that use only the lower solution (implicit);
    the others are refused. None: a fixed number of steps."""
    check_every: Annotated[int, Field(ge=0)] = 10
    """Inner solver with ``tol``: how often (in steps) the eager loop reads the stopping test on the
    host, one sync per reading; at most check_every - 1 frozen steps run after convergence. 0:
    never (static shape everywhere: all ``steps`` run, frozen once converged)."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Heavy-ball coefficient (momentum only)."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """Adam's moment decay rates."""
    eps: Annotated[float, Field(gt=0)] = 1e-8
    """Adam's denominator floor, added after the square root: lr m_hat / (sqrt(v_hat + eps_root) + eps)."""
    eps_root: Annotated[float, Field(ge=0)] = 0.0
    """Adam: added to v_hat inside the square root (TorchOpt's and optax's eps_root). 0 (the
    torch.optim.Adam form): at entries whose gradient has been exactly zero so far the derivative
    of the square root is taken as 0, which is exact there (docs/engines/unrolled.md); > 0 makes
    the update smooth in the gradient everywhere, a slightly different optimizer."""
    warm_start: bool = True
    """Inner solver: start each lower solve from the previous solution (else from the initial value)."""
    extrapolate: bool = False
    """Inner solver with ``warm_start`` and ``tol``: start the next solve at y_t + (y_t - y_{t-1}),
    the secant predictor along the path of lower solutions y*(x_t) (Allgower & Georg 1990,
    "Numerical Continuation Methods", ch. 2), instead of at y_t. A solve stopped on its residual
    ends at the same tolerance from either start, usually in fewer iterations; a fixed-step solve
    would change its result, so it is refused without ``tol``, as it is for engines that go
    through the optimizer's steps. ``solver: {name: auto}`` turns it on where it picks L-BFGS or
    Newton-CG (docs/inner-solvers.md)."""
    schedule: Literal["constant", "cosine", "linear", "cosine_power"] = "constant"
    """Learning-rate schedule from lr down to lr * final_lr_ratio (``bilevel.schedules``): over
    run.steps for the outer optimizer, over ``schedule_steps`` weight steps for the lower solver of
    the architecture-search engines (darts, rarts). cosine_power: cosine power annealing
    (sharpDARTS, Hundt et al. 2019), lr_t = low + (lr - low) (k^c - 1) / (k - 1) with
    c = (1 + cos(pi t / T)) / 2 and k = power_base."""
    final_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    """The schedule's last learning rate as a fraction of lr (sharpDARTS's search: 1e-4 / 0.025 = 0.004)."""
    power_base: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 2.0
    """cosine_power: the base k (sharpDARTS's exponent order; its search and training scripts use
    2); 1 is plain cosine annealing, larger values decay faster at first."""
    schedule_warmup: Annotated[int, Field(ge=0)] = 0
    """Steps of linear warm-up, from lr / (W + 1) up to lr, before the decay starts (sharpDARTS: 5
    epochs). Applies to every schedule, constant included."""
    schedule_steps: Annotated[int, Field(ge=1)] | None = None
    """Steps the schedule spans (after them the rate stays at its last value). None: run.steps for
    the outer optimizer; a lower solver with a schedule must set it (the weight steps of the whole
    search: run.steps x steps, plus the architecture's warm-up steps). A lower solver's schedule is
    applied by the darts and rarts engines; the other engines restart the inner solve at every
    outer step and run it at the constant lr."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """L2 penalty weight_decay/2 ||y||^2 on all of the level's variables. For the inner solver it is
    added to the lower objective itself (coupled weight decay, as torch.optim.SGD applies it), so
    every engine, the implicit one included, differentiates the same regularized problem; for the
    outer optimizer it is torch.optim's weight_decay."""
    tuned: dict[Literal["lr", "momentum", "weight_decay"], str] = Field(default_factory=dict)
    """Inner solver only: optimizer hyperparameters read from upper-level variables, e.g.
    {lr: inner_lr, weight_decay: wd}. Each named upper variable must be a scalar, except that lr
    may also be one learning rate per entry (Meta-SGD, Li et al. 2017): a tensor variable of the
    shape of the level's only tensor variable, or a module variable whose parameters have the shapes
    of the level's variables. Its current value (as the objectives see it) replaces the constant
    above, and hypergradients flow into it: the
    unrolled engine differentiates through the optimizer steps (learning-rate tuning through the
    optimizer; Maclaurin et al. 2015, Franceschi et al. 2017), and a tuned weight_decay changes the
    lower objective, so implicit engines see it too. A tuned lr or momentum does not move the lower
    solution, so only unrolling gives it a hypergradient; the planner then picks the unrolled engine."""
    tuned_schedule: TunedSchedule | None = None
    """Inner solver only: read the named tuned hyperparameters as schedules (an upper variable of
    shape [K]; inner step t uses entry floor(t K / horizon)). See docs/howto/tune-schedules-online.md."""
    lr_hypergradient: Annotated[float, Field(gt=0)] | None = None
    """Hypergradient descent (Baydin et al. 2018): the learning rate adapts itself online,
    lr_t = lr_{t-1} + beta <g_t, u_{t-1}>, starting from ``lr``, with beta this value, g_t the
    current gradient and u_{t-1} the previous step's direction (sgd: the previous gradient; adam:
    its previous bias-corrected update). sgd and adam only, as an inner solver or the outer
    optimizer; not with a tuned lr or an outer learning-rate schedule. None: a fixed lr."""

    history: Annotated[int, Field(ge=1)] = 10
    """lbfgs: curvature pairs (s, y) kept, m in Nocedal & Wright's notation; 2 m copies of the lower
    variables. The memory starts empty at every solve (warm starts carry the iterate, not the pairs)."""
    cg_maxiter: Annotated[int, Field(ge=1)] = 20
    """newton_cg: CG iterations (Hessian-vector products) per Newton step, at most; CG stops earlier
    on the device once ||H d + g|| <= min(0.5, sqrt(||g||)) ||g|| (the forcing sequence of
    Nocedal & Wright 2006, eq. 7.3, for superlinear convergence)."""
    line_search_trials: Annotated[int, Field(ge=1)] = 4
    """newton_cg: step sizes 1, backtrack, backtrack^2, ... tried per Newton step, each one objective
    value (all of them evaluated: no host sync); the first that satisfies the sufficient-decrease
    test is taken. When none does, the next step starts its trials where these ended. (lbfgs tries
    one step size per iteration: a rejected trial shrinks the next one.)"""
    sufficient_decrease: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    """lbfgs, newton_cg: c1 of Armijo's condition G(y + a d) <= G(y) + c1 a grad G^T d (up to the
    rounding error of G, 8 machine epsilons of |G(y)|: without it the test fails from rounding near
    the solution in float32 and the solve stalls)."""
    backtrack: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """lbfgs, newton_cg: factor by which a rejected step size shrinks."""

    @field_validator("tuned_schedule")
    @classmethod
    def _scheduled_are_tuned(cls, value: TunedSchedule | None, info: ValidationInfo) -> TunedSchedule | None:
        tuned = info.data.get("tuned", {})
        missing = [name for name in (value.hyperparameters if value else []) if name not in tuned]
        if missing:
            raise ValueError(f"{', '.join(missing)} must be tuned by an upper variable (solver.tuned) to be read as a"
                             f" schedule; tuned here: {', '.join(tuned) or 'nothing'}")
        return value

    @field_validator("lr_hypergradient")
    @classmethod
    def _hypergradient_descent(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        name = info.data.get("name")
        if name not in ("sgd", "adam"):
            raise ValueError(f"hypergradient descent is defined for sgd and adam (Baydin et al. 2018), not {name}")
        if "lr" in info.data.get("tuned", {}):
            raise ValueError("the learning rate is tuned by an upper variable (tuned.lr); it cannot also adapt itself")
        if info.data.get("schedule", "constant") != "constant":
            raise ValueError(f"the learning rate adapts itself; drop schedule: {info.data['schedule']} (use constant)")
        return value

    @model_validator(mode="after")
    def _second_order_solvers_have_no_step_hyperparameters(self) -> "OptimizerSpec":
        if self.name in SECOND_ORDER:
            tuned = [k for k in self.tuned if k != "weight_decay"]
            if tuned:
                raise ValueError(f"{self.name} takes its steps from curvature and a line search: it has no"
                                 f" {' or '.join(tuned)} to tune (tuned: {', '.join(tuned)}); tune them on sgd, momentum"
                                 " or adam with an engine that differentiates the optimizer's steps")
            if self.tuned_schedule is not None:
                raise ValueError(f"{self.name} has no step-size schedule; drop tuned_schedule")
        return self
