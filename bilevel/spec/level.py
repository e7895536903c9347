"""One level of a bilevel problem: its variables, objective, data, inner solver and declared facts.
(``OptimizerSpec``, the solver, lives in ``bilevel.spec.optimizer`` and is re-exported here.)"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from bilevel.spec._base import CallableRef, SpecModel
from bilevel.spec.blocks import BlocksSpec
from bilevel.spec.constraints import ConstraintSpec, VariableSet
from bilevel.spec.hyperparameter import HyperparameterVariable
from bilevel.spec.optimizer import SECOND_ORDER, OptimizerSpec
from bilevel.spec.prox import ProxOperator
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


class Assumptions(SpecModel):
    """Facts the user declares about a level; the planner reads them to pick an engine."""

    convexity: Literal["strongly_convex", "convex", "nonconvex", "unknown"] = "unknown"
    """Convexity of this level's objective in its own variables (for a lower level)."""
    smoothness: Literal["bounded", "unbounded", "unknown"] = "unknown"
    """Lipschitz smoothness of the objective: unbounded for e.g. RNN/LSTM upper levels. On a lower
    level, bounded (a Lipschitz gradient, e.g. a twice-differentiable objective) together with
    strongly_convex lets the planner give a ``solver: {name: auto}`` L-BFGS or Newton-CG."""
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

    @field_validator("solver")
    @classmethod
    def _outer_optimizer_is_first_order(cls, solver: OptimizerSpec | None, info: ValidationInfo) -> OptimizerSpec | None:
        if solver is None or info.data.get("parent") is not None:
            return solver
        if solver.name in (*SECOND_ORDER, "auto"):
            raise ValueError(f"{solver.name} is an inner solver (a lower level's); the top level's outer optimizer is one of"
                             " sgd, momentum, adam, normalized_momentum")
        if solver.tol is not None:
            raise ValueError("tol stops an inner solve on its residual; the top level's outer optimizer runs run.steps steps")
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
