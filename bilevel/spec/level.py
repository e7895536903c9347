"""One level of a bilevel problem: its variables, objective, data, inner solver and declared facts."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from bilevel.spec._base import CallableRef, SpecModel
from bilevel.spec.blocks import BlocksSpec
from bilevel.spec.constraints import ConstraintSpec, VariableSet
from bilevel.spec.hyperparameter import HyperparameterVariable
from bilevel.spec.prox import ProxOperator
from bilevel.spec.schedule import TunedSchedule
from bilevel.spec.search_space import ArchitectureVariable, SupernetVariable
from bilevel.spec.tasks import ProxSpec

__all__ = [
    "Assumptions",
    "DataSpec",
    "LevelSpec",
    "ModuleVariable",
    "OptimizerSpec",
    "TensorVariable",
    "Variable",
]



class TensorVariable(SpecModel):
    """A tensor-valued variable, created on the run's device and dtype."""

    kind: Literal["tensor"] = "tensor"
    """Discriminator: a plain tensor."""
    shape: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    """Shape of the tensor; [] is a scalar."""
    init: Union[float, Literal["zeros", "ones", "normal", "uniform"], CallableRef] = 0.0
    """Initial value: a constant, a named initializer (normal and uniform are scaled by init_scale),
    or a reference to a function returning a tensor of the declared shape."""
    init_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to an init function reference (e.g. which real examples start a
    synthetic data set); only allowed when ``init`` is a reference."""
    init_scale: float = 1.0
    """Standard deviation of "normal" / half-width of "uniform"."""
    set: VariableSet | None = None
    """Simple set the variable is projected onto after each update: {kind: box, low, high} (the
    default kind) or {kind: simplex, radius}. None: unconstrained."""
    prox: ProxOperator | None = None
    """Lower levels: a non-smooth convex term g of the level's objective on this variable, given by
    its proximal operator ({kind: l1, strength: lam}, elastic_net, group_lasso, or custom); the
    objective function returns the smooth part only, and the inner solver (sgd) takes proximal
    gradient steps. A strength may name an upper tensor variable (its hypergradient is then
    computed through the prox). See docs/concepts.md#non-smooth-lower-levels. None: smooth."""

    @model_validator(mode="after")
    def _kwargs_need_a_reference(self) -> "TensorVariable":
        if self.init_kwargs and (not isinstance(self.init, str) or ":" not in self.init):
            raise ValueError(f"init_kwargs are passed to an init function; init is {self.init!r}, not a reference"
                             ' "module:attr"')
        return self


class ModuleVariable(SpecModel):
    """A torch.nn.Module built by a factory; its parameters are the variable.

    Objectives receive a callable that runs the module functionally on the current parameters,
    so ``lower["net"](x)`` works whatever engine is running."""

    kind: Literal["module"] = "module"
    """Discriminator: a module built by a factory."""
    factory: CallableRef
    """Callable returning an nn.Module, e.g. "torch.nn:Linear"."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""
    init: Annotated[float, Field(allow_inf_nan=False)] | None = None
    """A constant for every parameter of the module instead of the factory's initialization (e.g.
    Meta-SGD's per-parameter learning rates, declared as a module of the network's shape)."""


def _variable_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("kind", "tensor")
    return getattr(value, "kind", None)


Variable = Annotated[
    Union[
        Annotated[TensorVariable, Tag("tensor")],
        Annotated[ModuleVariable, Tag("module")],
        Annotated[ArchitectureVariable, Tag("architecture")],
        Annotated[SupernetVariable, Tag("supernet")],
        Annotated[HyperparameterVariable, Tag("hyperparameter")],
    ],
    Discriminator(_variable_kind),
]


class DataSpec(SpecModel):
    """Where a level's minibatches come from."""

    source: CallableRef
    """Callable returning a mapping name -> Tensor (equal first dimensions), e.g. {"x": X, "y": Y}."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the source."""
    batch_size: Annotated[int, Field(ge=1)] | None = None
    """Examples per minibatch; None uses the whole data set as one (deterministic) batch. In a
    data-parallel run: examples per minibatch on each rank, drawn from its shard."""
    order: Literal["shuffled", "per_outer_step", "paired"] = "shuffled"
    """Which minibatch each use of the level's data gets. shuffled: the next one of the level's own
    shuffled epochs at every draw: a fresh batch at each inner step (and for the linearization).
    per_outer_step: one minibatch per outer step, used by every inner step and product of that
    step (the inner loops of TorchOpt's and higher's tests). paired (a lower level): at outer step
    k, the examples at the indices of the top level's batch k, held for the step; with the same
    data source both levels see the same batch k. The top level draws once per outer step
    whatever its order. See docs/concepts.md#data-order."""
    shard: bool = True
    """Data-parallel runs (torchrun): split the examples (the rows of every tensor) over the ranks,
    so that each holds one shard. False: every rank holds the whole data, for data that are not a
    set of examples (a matrix, a graph). Ignored in a single process."""


class OptimizerSpec(SpecModel):
    """A first-order optimizer: the lower level's inner solver or the upper level's outer optimizer."""

    name: Literal["sgd", "momentum", "adam", "normalized_momentum"] = "sgd"
    """sgd: y <- y - lr g; momentum: heavy ball m <- mu m + g, y <- y - lr m; adam: Kingma & Ba 2015;
    normalized_momentum (outer optimizer only; BO-REP): m <- mu m + (1 - mu) g, x <- x - lr m / ||m||."""
    lr: Annotated[float, Field(gt=0)] = 0.1
    """Step size."""
    steps: Annotated[int, Field(ge=0)] = 100
    """Inner solver: steps per lower solve. Ignored for the outer optimizer (see run.steps)."""
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


class Assumptions(SpecModel):
    """Facts the user declares about a level; the planner reads them to pick an engine."""

    convexity: Literal["strongly_convex", "convex", "nonconvex", "unknown"] = "unknown"
    """Convexity of this level's objective in its own variables (for a lower level)."""
    smoothness: Literal["bounded", "unbounded", "unknown"] = "unknown"
    """Lipschitz smoothness of the objective: unbounded for e.g. RNN/LSTM upper levels."""
    quadratic: bool = False
    """The objective is quadratic in this level's variables (for a lower level): with constraints
    declared ``affine``, the level is a QP, which the planner may solve by the batched
    interior-point engine ``qp`` (docs/engines/qp.md). Checked at the engine's first step."""


class LevelSpec(SpecModel):
    """A level: variables optimized against an objective, possibly given the levels above it."""

    variables: dict[str, Variable]
    """Named variables of this level (names are unique across the whole problem)."""
    objective: CallableRef
    """f(upper, lower, batch) -> scalar Tensor (see docs/concepts.md for what upper/lower hold)."""
    objective_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments bound to the objective."""
    parent: str | None = None
    """Name of the level this one is solved under (None for the top level)."""
    data: DataSpec | None = None
    """The level's data source (None: the objective receives batch=None)."""
    solver: OptimizerSpec | None = None
    """Inner solver of a lower level, or outer optimizer of the top level."""
    assumptions: Assumptions = Field(default_factory=Assumptions)
    """Declared facts about this level."""
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    """Constraints on this level's variables (feasible where <= 0 / == 0)."""
    solution: CallableRef | None = None
    """Closed-form solver of a lower level: f(upper, lower, batch) -> mapping variable name ->
    Tensor, the minimizer of the level's objective (weight decay included, inside its sets) for
    every tensor variable of the level, e.g. a kernel ridge regression solved with
    torch.linalg.solve. When given, every lower solve returns it instead of running the inner
    solver's steps, so the implicit engine differentiates the exact solution; the inner solver
    may then be omitted (it matters only to engines that step through it)."""
    solution_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments bound to the closed-form solver."""
    init_from: str | dict[str, str] | None = None
    """Start every solve of this lower level at upper variables instead of its own init: the upper
    variable (for the level's only variable), or a mapping lower variable -> upper variable of the
    same shape (MAML, ANIL, Meta-SGD: the upper variables are the initialization the solve adapts).
    The start then depends on the upper variables: unrolling differentiates through it."""
    prox: ProxSpec | None = None
    """A proximal term lam/2 ||y - anchor||^2 added to this lower level's objective (iMAML)."""
    blocks: BlocksSpec | None = None
    """Declare this lower level as m blocks under the shared upper variables, each with its own
    variables, data and warm-started solution, k of them drawn per outer step (multi-block
    bilevel optimization; docs/howto/trees-and-blocks.md). None: one lower problem."""

    @field_validator("solver")
    @classmethod
    def _lower_schedule_has_a_length(cls, solver: OptimizerSpec | None, info: ValidationInfo) -> OptimizerSpec | None:
        scheduled = solver is not None and (solver.schedule != "constant" or solver.schedule_warmup > 0)
        if scheduled and info.data.get("parent") is not None and solver.schedule_steps is None:
            raise ValueError(
                f"the lower solver's schedule ({solver.schedule}, warm-up {solver.schedule_warmup}) needs schedule_steps: the"
                " number of weight steps it spans (for a DARTS search: run.steps x steps, plus the architecture's"
                " warmup_steps); only the outer optimizer's schedule defaults to run.steps"
            )
        if solver is not None and solver.schedule_steps is not None and solver.schedule_warmup >= solver.schedule_steps:
            raise ValueError(f"schedule_warmup ({solver.schedule_warmup}) must be smaller than schedule_steps"
                             f" ({solver.schedule_steps}): the warm-up would leave no step to decay over")
        return solver

    @field_validator("variables")
    @classmethod
    def _non_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("a level needs at least one variable")
        for name in value:
            if not name.isidentifier():
                raise ValueError(f"variable name {name!r} must be a Python identifier")
        return value
