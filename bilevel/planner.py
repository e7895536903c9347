"""The planner: from what a spec declares to an engine configuration, with reasons.

Rules read engine capabilities (``bilevel.engines.registry``), never engine classes, so an engine
that registers itself is considered without changes here. An explicit engine always wins; the
planner then only warns where the engine's assumptions contradict the declared facts, and
refuses where it cannot work at all (e.g. declared constraints it cannot handle)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bilevel.engines.registry import engine_capabilities
from bilevel.problem import Problem
from bilevel.spec.engine import AutoEngine, ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.spec.errors import SpecError
from bilevel.spec.load import LoadedSpec
from bilevel.stn.layers import StnLayer

__all__ = ["Plan", "ProblemFacts", "architecture_memory_mb", "make_plan", "memory_budget_mb"]

DEFAULT_CPU_MEMORY_MB = 4096.0
CLOSED_FORM_DIRECT_SIZE = 1024
"""Largest closed-form lower level whose Hessian the planner assembles and solves densely."""


def memory_budget_mb(loaded: LoadedSpec, device: torch.device) -> float:
    """run.budget.memory_mb, or 80% of the free GPU memory, or DEFAULT_CPU_MEMORY_MB on CPU."""
    budget = loaded.spec.run.budget.memory_mb
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = 0.8 * free / 2**20
        else:
            budget = DEFAULT_CPU_MEMORY_MB
    return float(budget)


@dataclass(frozen=True)
class ProblemFacts:
    """What the planner knows: declared assumptions, sizes and the memory budget."""

    upper_level: str
    outer_optimizer: str
    lower_level: str
    lower_convexity: str
    upper_smoothness: str
    constraints: int
    coupled_constraints: int
    tuned_step: tuple[str, ...]
    """Inner-solver hyperparameters that only unrolling differentiates (tuned lr / momentum)."""
    n_upper: int
    n_lower: int
    inner_steps: int
    lower_batch_numel: int
    bytes_per_scalar: int
    memory_mb: float
    device: str
    closed_form: bool = False
    """The lower level declares a closed-form solution (``solution``): it is solved exactly."""
    architecture: tuple[str, ...] = ()
    """Upper variables declared as architecture mixtures ({kind: architecture})."""
    lower_solver: str = "sgd"
    """The lower level's inner solver (sgd, momentum, adam)."""
    activation_mb: float = 0.0
    """Estimated activation memory of one forward/backward of the lower level's supernet on a batch."""
    gradient_free_hyperparameters: tuple[str, ...] = ()
    """Upper hyperparameter variables no gradient reaches: discrete (integer, categorical) or
    declared ``differentiable: false`` (a dropout rate)."""
    discrete_hyperparameters: tuple[str, ...] = ()
    """The integer and categorical ones among them."""
    best_response_model: bool = False
    """The lower level contains STN layers: a model that takes the hyperparameters as input."""
    upper_modules: tuple[str, ...] = ()
    """Module variables of the upper level."""
    continuous_scalars: tuple[str, ...] = ()
    """Upper tensor variables that are continuous scalars (what an engine may draw per example)."""
    instances: int | None = None
    """Independent instances solved as one batch (None: one problem); sizes above are totals."""

    @classmethod
    def of(cls, loaded: LoadedSpec, problem: Problem) -> "ProblemFacts":
        spec = loaded.spec
        upper, lower = problem.upper, problem.lower
        lower_spec = spec.levels[lower.name]
        upper_spec = spec.levels[upper.name]
        batch_numel = 0
        if lower.data is not None:
            size = lower.data.batch_size or lower.data.size
            per_example = getattr(lower.data, "example_numel", None)  # a batch of instances
            batch_numel = per_example() * size if per_example else sum(v[0].numel() * size for v in lower.data.full.values())
        budget = memory_budget_mb(loaded, problem.device)
        return cls(
            upper_level=upper.name,
            outer_optimizer=upper_spec.solver.name if upper_spec.solver is not None else "sgd",
            lower_level=lower.name,
            lower_convexity=lower_spec.assumptions.convexity,
            upper_smoothness=upper_spec.assumptions.smoothness,
            constraints=len(lower_spec.constraints),
            coupled_constraints=sum(c.coupled for c in lower_spec.constraints),
            tuned_step=tuple(sorted(k for k in lower_spec.solver.tuned if k != "weight_decay")) if lower_spec.solver else (),
            n_upper=upper.numel,
            n_lower=lower.numel,
            inner_steps=lower.solver.steps if lower.solver else 0,
            lower_batch_numel=batch_numel,
            bytes_per_scalar=torch.finfo(problem.dtype).bits // 8,
            memory_mb=float(budget),
            device=str(problem.device),
            closed_form=lower.solution is not None,
            **_architecture_facts(upper_spec, lower_spec, problem),
            gradient_free_hyperparameters=tuple(n for n, t in upper.transforms.items() if t.gradient_free),
            discrete_hyperparameters=tuple(n for n, t in upper.transforms.items() if t.discrete),
            best_response_model=any(isinstance(m, StnLayer) for b in lower.modules.values() for m in b.module.modules()),
            upper_modules=tuple(upper.modules),
            continuous_scalars=tuple(n for n, i in upper.tensors.items()
                                     if not upper.transform(n).discrete and upper.init[i].numel() == 1),
            instances=problem.instances,
        )

    def unrolled_memory_mb(self, stored_steps: int) -> float:
        """Rough graph memory of differentiating through ``stored_steps`` inner steps: each keeps
        the iterate, its gradient and optimizer buffers (~4 copies of y) and activations at least
        the size of the lower batch."""
        per_step = self.bytes_per_scalar * (4 * self.n_lower + self.lower_batch_numel)
        return stored_steps * per_step / 2**20


@dataclass(frozen=True)
class Plan:
    """The chosen engine configuration and why."""

    engine: Any
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)
    facts: ProblemFacts | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine.kind,
            "config": self.engine.model_dump(mode="json"),
            "reasons": self.reasons,
            "warnings": self.warnings,
            "facts": None if self.facts is None else asdict(self.facts),
        }


def _check_hard_requirements(kind: str, facts: ProblemFacts, loaded: LoadedSpec) -> None:
    caps = engine_capabilities()[kind]
    path = f"levels.{facts.lower_level}.constraints"
    if facts.constraints and not caps.handles_constraints:
        raise loaded.error(path, f"the {kind} engine cannot handle lower-level constraints ({facts.constraints} declared);"
                           f" engines that can: {', '.join(_able(lambda c: c.handles_constraints)) or 'none'}")
    if facts.coupled_constraints and not caps.handles_coupled_constraints:
        raise loaded.error(path, f"the {kind} engine cannot handle constraints coupling both levels")


def _explicit(requested: Any, facts: ProblemFacts, loaded: LoadedSpec) -> Plan:
    kind = requested.kind
    caps = engine_capabilities()
    if kind not in caps:
        raise loaded.error("engine.kind", f"no engine {kind!r} is registered; available: {', '.join(caps)}")
    _check_hard_requirements(kind, facts, loaded)
    _check_hyperparameter_support(kind, facts, loaded)
    _check_per_example(requested, facts, loaded)
    warnings = []
    if facts.tuned_step and not caps[kind].through_optimizer:
        warnings.append(
            f"levels.{facts.lower_level}.solver.tuned names {', '.join(facts.tuned_step)}, which the {kind} engine does not"
            " differentiate (it does not go through the optimizer's steps): their hypergradient will be zero"
        )
    if facts.lower_convexity not in caps[kind].lower_convexity:
        warnings.append(
            f"the {kind} engine assumes a lower level that is {' or '.join(caps[kind].lower_convexity)}, but"
            f" levels.{facts.lower_level}.assumptions.convexity = {facts.lower_convexity}: its hypergradient may be wrong"
        )
    if facts.closed_form and caps[kind].through_optimizer:
        warnings.append(
            f"levels.{facts.lower_level}.solution solves the lower level in closed form, but the {kind} engine"
            " differentiates the inner solver's steps (started from that solution); the implicit engine is exact here"
        )
    return Plan(requested, [f"engine {kind!r} requested explicitly in the spec or on the command line"], warnings, facts)


def make_plan(loaded: LoadedSpec, problem: Problem, requested: Any | None = None) -> Plan:
    """Choose an engine for ``problem``; ``requested`` (or the spec's engine) overrides unless auto.

    Rules, in order: declared constraints -> an engine that handles them; discrete or
    non-differentiable hyperparameters -> an engine that handles them (STN); unbounded upper
    smoothness -> an engine designed for it; strongly convex lower level -> implicit; nonconvex
    lower level -> a first-order penalty engine; otherwise unrolled, checkpointed or truncated to
    fit the memory budget. Chains of more than two levels follow bilevel/multilevel/plan.py."""
    requested = requested if requested is not None else loaded.spec.engine
    from bilevel.multilevel.chain import ChainProblem

    if isinstance(problem, ChainProblem):  # more than two levels: their own rules
        from bilevel.multilevel.plan import plan_chain

        return plan_chain(loaded, problem, requested)
    facts = ProblemFacts.of(loaded, problem)
    if not isinstance(requested, AutoEngine):
        plan = _explicit(requested, facts, loaded)
    else:
        for rule in (_architecture, _constrained, _gradient_free_hyperparameters, _closed_form, _tuned_optimizer,
                     _unbounded_smoothness, _strongly_convex, _nonconvex, _unrolled):
            plan = rule(facts, loaded)
            if plan is not None:
                break
        _check_hyperparameter_support(plan.engine.kind, facts, loaded)  # e.g. constraints and a discrete hyperparameter
    _check_instances(plan, facts, loaded)
    return _with_architecture_advice(_with_outer_optimizer_advice(plan, facts), facts)


def _check_instances(plan: Plan, facts: ProblemFacts, loaded: LoadedSpec) -> None:
    """A batch of instances needs an engine that keeps them apart (and CG rather than a direct solve)."""
    if not facts.instances:
        return
    kind = plan.engine.kind
    if not engine_capabilities()[kind].handles_instances:
        able = ", ".join(_able(lambda c: c.handles_instances))
        raise loaded.error("instances", f"the {kind} engine does not support a batch of instances; engines that do: {able}")
    solver = getattr(plan.engine, "linear_solver", None)
    if solver is not None and solver.method == "direct":
        raise loaded.error("engine.linear_solver.method", "the direct solve does not support a batch of instances; use cg")


def _with_outer_optimizer_advice(plan: Plan, facts: ProblemFacts) -> Plan:
    wanted = engine_capabilities()[plan.engine.kind].outer_optimizer
    if wanted is None or wanted == facts.outer_optimizer:
        return plan
    advice = (f"the {plan.engine.kind} engine is defined with the upper-level optimizer {wanted!r}, but"
              f" levels.{facts.upper_level}.solver.name = {facts.outer_optimizer!r}")
    return Plan(plan.engine, plan.reasons, [*plan.warnings, advice], plan.facts)


def _able(predicate: Any) -> list[str]:
    return [kind for kind, caps in engine_capabilities().items() if predicate(caps)]


def _constrained(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if not facts.constraints:
        return None
    path = f"levels.{facts.lower_level}.constraints"
    able = _able(lambda c: c.handles_constraints and (c.handles_coupled_constraints or not facts.coupled_constraints))
    if not able:
        raise loaded.error(path, "no registered engine handles these lower-level constraints")
    kind = able[0]
    coupled = f", {facts.coupled_constraints} of them coupling both levels" if facts.coupled_constraints else ""
    reasons = [
        f"{path} declares {facts.constraints} constraint(s){coupled}: only engines that handle lower-level"
        f" constraints qualify ({', '.join(able)}); {kind} treats them through a proximal Lagrangian value"
        " function with first derivatives only, projecting (x, y) onto the constraints declared affine"
    ]
    warnings = []
    if facts.lower_convexity not in engine_capabilities()[kind].lower_convexity:
        warnings.append(f"{kind} assumes a convex lower level; levels.{facts.lower_level}.assumptions.convexity ="
                        f" {facts.lower_convexity}")
    return Plan(_default_config(kind), reasons, warnings, facts)


def _hyperparameter_kind(facts: ProblemFacts, name: str) -> str:
    return "discrete" if name in facts.discrete_hyperparameters else "declared differentiable: false"


def _check_hyperparameter_support(kind: str, facts: ProblemFacts, loaded: LoadedSpec) -> None:
    """Refuse an engine that cannot take the declared hyperparameters, or that needs a
    best-response model the lower level does not have, or one whose response cannot learn the
    effect of an inner optimizer's tuned step settings (lr, momentum)."""
    caps = engine_capabilities()[kind]
    upper = f"levels.{facts.upper_level}.variables"
    issues = []
    if not caps.handles_discrete:
        able = ", ".join(_able(lambda c: c.handles_discrete)) or "none"
        issues += [
            loaded.issue(f"{upper}.{name}",
                         f"the {kind} engine cannot take this hyperparameter ({_hyperparameter_kind(facts, name)}): it needs"
                         f" gradients of the objectives in the upper variables, and none reaches it; engines that can: {able}"
                         " (or leave engine: auto)")
            for name in facts.gradient_free_hyperparameters
        ]
    if caps.needs_best_response:
        if not facts.best_response_model:
            issues.append(loaded.issue(
                f"levels.{facts.lower_level}.variables",
                f"the {kind} engine fits a best-response model: build the lower level's model from STN layers"
                " (bilevel.stn.StnLinear, StnConv2d, StnTensor) called with bilevel.stn.hyper_input(upper); see docs/engines/stn.md"))
        issues += [
            loaded.issue(f"{upper}.{name}",
                         f"the {kind} engine perturbs tensor and hyperparameter variables; a module variable upstairs is not supported")
            for name in facts.upper_modules
        ]
        issues += [
            loaded.issue(f"levels.{facts.lower_level}.solver.tuned.{name}",
                         f"the {kind} engine fits a best response to the training objective, which the optimizer's {name} does"
                         " not enter (it changes the path, not the objective): the response cannot learn its effect. Tune"
                         f" {name} with the unrolled engine; weight_decay can be tuned here (it is a term of the training objective)")
            for name in facts.tuned_step
        ]
    if issues:
        raise SpecError(issues)


def _check_per_example(config: Any, facts: ProblemFacts, loaded: LoadedSpec) -> None:
    """An engine config's per-example draws name continuous scalar upper variables."""
    bad = [name for name in getattr(config, "per_example", ()) if name not in facts.continuous_scalars]
    if bad:
        raise loaded.error("engine.per_example",
                           f"{', '.join(map(repr, bad))}: only continuous scalar upper variables can be drawn per example"
                           f" (here: {', '.join(facts.continuous_scalars) or 'none'})")


def _gradient_free_hyperparameters(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if not facts.gradient_free_hyperparameters:
        return None
    upper = f"levels.{facts.upper_level}.variables"
    able = _able(lambda c: c.handles_discrete and not c.handles_constraints)
    if not able:
        raise loaded.error(f"{upper}.{facts.gradient_free_hyperparameters[0]}",
                           "no registered engine handles discrete or non-differentiable hyperparameters")
    kind = able[0]
    _check_hyperparameter_support(kind, facts, loaded)
    named = ", ".join(f"{upper}.{n} ({_hyperparameter_kind(facts, n)})" for n in facts.gradient_free_hyperparameters)
    reasons = [
        f"{named}: no gradient of the objectives reaches these, so hypergradient engines cannot tune them; {kind}"
        " fits the lower level's best-response model (its STN layers) at hyperparameters perturbed around the"
        " current ones, and steps the hyperparameters on the validation objective through that model"
        " (MacKay et al. 2019), discrete ones by a score-function or straight-through gradient"
    ]
    return Plan(_default_config(kind), reasons, [], facts)


def _tuned_optimizer(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if not facts.tuned_step:
        return None
    plan = _unrolled(facts, loaded)
    reason = (
        f"levels.{facts.lower_level}.solver.tuned names {', '.join(facts.tuned_step)}: these change the path of the inner"
        " optimizer but not the lower solution it converges to, so only differentiating through the optimizer's"
        " steps (unrolled) gives them a hypergradient"
    )
    return Plan(plan.engine, [reason, *plan.reasons[1:]], plan.warnings, facts)


def _unbounded_smoothness(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if facts.upper_smoothness != "unbounded":
        return None
    able = _able(lambda c: c.unbounded_smoothness and facts.lower_convexity in c.lower_convexity)
    if not able:
        return None
    kind = able[0]
    reasons = [
        f"levels.{facts.upper_level}.assumptions.smoothness = unbounded (e.g. a recurrent network): {kind} is"
        " designed for upper objectives whose smoothness grows with the gradient, with normalized momentum"
        " upstairs, periodic lower updates and one HVP step on the linear system per iteration"
    ]
    return Plan(_default_config(kind), reasons, [], facts)


def _default_config(kind: str) -> Any:
    from pydantic import TypeAdapter

    from bilevel.spec.engine import EngineSpec

    return TypeAdapter(EngineSpec).validate_python({"kind": kind})


def _strongly_convex(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if facts.lower_convexity != "strongly_convex" or "implicit" not in engine_capabilities():
        return None
    lower = f"levels.{facts.lower_level}"
    reasons = [
        f"{lower}.assumptions.convexity = strongly_convex: the lower solution is unique and the implicit"
        " function theorem applies, so the implicit engine gives the exact hypergradient once the inner"
        f" solve converges, with memory independent of the {facts.inner_steps} inner steps"
    ]
    default_cg = LinearSolverSpec()
    if facts.n_lower <= default_cg.maxiter and not facts.instances:
        solver = LinearSolverSpec(method="direct")
        reasons.append(
            f"the lower level has {facts.n_lower} scalars (<= {default_cg.maxiter} CG iterations): assembling H"
            " from one batched HVP and solving directly is exact and no dearer than CG"
        )
    else:
        solver = default_cg
        reasons.append(
            f"the lower level has {facts.n_lower} scalars: H v = grad_y F is solved by conjugate gradient"
            f" ({solver.maxiter} iterations on Hessian-vector products, no dense Hessian)"
        )
    return Plan(ImplicitConfig(linear_solver=solver), reasons, [], facts)


def _closed_form(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if not facts.closed_form or "implicit" not in engine_capabilities():
        return None
    lower = f"levels.{facts.lower_level}"
    reasons = [
        f"{lower}.solution gives the lower solution in closed form: it is exact, so implicit differentiation at it"
        " gives the exact hypergradient (no inner steps to unroll, no inner residual)"
    ]
    if facts.n_lower <= CLOSED_FORM_DIRECT_SIZE:
        solver = LinearSolverSpec(method="direct")
        reasons.append(
            f"the lower level has {facts.n_lower} scalars (<= {CLOSED_FORM_DIRECT_SIZE}): H is assembled from one batched"
            " HVP and solved directly, so the linear solve is exact too"
        )
    else:
        solver = LinearSolverSpec(maxiter=100)
        reasons.append(
            f"the lower level has {facts.n_lower} scalars (> {CLOSED_FORM_DIRECT_SIZE}; a dense solve costs O(n^3) per step):"
            f" H v = grad_y F is solved by conjugate gradient ({solver.maxiter} iterations on Hessian-vector products)"
        )
    return Plan(ImplicitConfig(linear_solver=solver), reasons, [], facts)


def _nonconvex(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if facts.lower_convexity != "nonconvex":
        return None
    able = _able(lambda c: c.first_order and "nonconvex" in c.lower_convexity and not c.handles_constraints)
    if not able:
        return None
    kind = able[0]
    reasons = [
        f"levels.{facts.lower_level}.assumptions.convexity = nonconvex: the lower solution may be non-unique and"
        f" its Hessian indefinite, so implicit differentiation does not apply; {kind} penalizes the value-function"
        " gap G(x, y) - min_w G(x, w) with first derivatives only (bias O(1/gamma), no uniqueness assumed)"
    ]
    return Plan(_default_config(kind), reasons, [], facts)


def _unrolled(facts: ProblemFacts, loaded: LoadedSpec) -> Plan:
    caps = engine_capabilities()
    convexity = facts.lower_convexity
    lower = f"levels.{facts.lower_level}"
    if "unrolled" not in caps:
        raise loaded.error(f"{lower}.assumptions.convexity", f"no registered engine accepts a {convexity} lower level")
    reasons = [
        f"{lower}.assumptions.convexity = {convexity}: the implicit function theorem needs a strongly convex"
        " lower level, so the hypergradient is taken through the inner optimizer itself (unrolled), which is"
        " the exact derivative of what the inner solver computes"
    ]
    steps = facts.inner_steps
    full = facts.unrolled_memory_mb(steps)
    config = UnrolledConfig()
    if full <= facts.memory_mb:
        reasons.append(f"storing all {steps} inner steps needs about {full:.0f} MiB, within the {facts.memory_mb:.0f} MiB budget")
    else:
        every = max(1, int(math.ceil(math.sqrt(steps))))
        stored = math.ceil(steps / every) + every
        ckpt = facts.unrolled_memory_mb(stored)
        if ckpt <= facts.memory_mb:
            config = UnrolledConfig(checkpoint_every=every)
            reasons.append(
                f"storing all {steps} inner steps needs about {full:.0f} MiB, over the {facts.memory_mb:.0f} MiB budget:"
                f" checkpointing every {every} steps keeps about {ckpt:.0f} MiB at the cost of one extra forward pass"
            )
        else:
            per_step = facts.unrolled_memory_mb(1)
            keep = max(1, int(facts.memory_mb // max(per_step, 1e-9)))
            config = UnrolledConfig(truncate=min(keep, steps))
            reasons.append(
                f"even checkpointed, {steps} inner steps exceed the {facts.memory_mb:.0f} MiB budget: differentiating"
                f" through the last {config.truncate} steps only (truncated, biased)"
            )
    return Plan(config, reasons, [], facts)


# --- architecture search ------------------------------------------------------------------------
def _architecture_facts(upper_spec: Any, lower_spec: Any, problem: Problem) -> dict[str, Any]:
    names = tuple(n for n, v in upper_spec.variables.items() if getattr(v, "kind", None) == "architecture")
    if not names:
        return {}
    from bilevel.nas.memory import supernet_activation_mb

    return {
        "architecture": names,
        "lower_solver": lower_spec.solver.name if lower_spec.solver is not None else "sgd",
        "activation_mb": supernet_activation_mb(problem),
    }


def architecture_memory_mb(facts: ProblemFacts) -> dict[str, float]:
    """Peak memory estimates (MiB) of one outer step of the architecture engines: activations A of
    one forward/backward plus copies of the weights W held at the peak (first-order DARTS: w, its
    momentum, a gradient; second order adds the virtual weights w' and v = grad_w' L_val, a gradient
    at a time; its exact mixed product keeps the graph of grad_w L_train for a second backward,
    about twice the activations; RARTS: w, y, both momenta and a gradient)."""
    weights = facts.bytes_per_scalar * facts.n_lower / 2**20
    return {
        "darts_first_order": facts.activation_mb + 3 * weights,
        "darts_second_order": facts.activation_mb + 4 * weights,
        "darts_second_order_exact": 2 * facts.activation_mb + 4 * weights,
        "rarts": facts.activation_mb + 5 * weights,
    }


def _architecture(facts: ProblemFacts, loaded: LoadedSpec) -> Plan | None:
    if not facts.architecture:
        return None
    from bilevel.spec.engine import DartsConfig, RartsConfig

    caps = engine_capabilities()
    if "darts" not in caps:
        able = _able(lambda c: c.handles_architecture)
        if not able:
            return None
        return Plan(_default_config(able[0]), [f"architecture mixture upstairs: {able[0]} handles it"], [], facts)
    names = ", ".join(f"levels.{facts.upper_level}.variables.{n}" for n in facts.architecture)
    memory = architecture_memory_mb(facts)
    budget = facts.memory_mb
    reasons = [
        f"{names} is an architecture mixture (kind: architecture): differentiable architecture search, one"
        " warm-started weight step and one architecture step per outer step (the DARTS family) instead of"
        " solving the supernet's training to convergence for every hypergradient"
    ]
    estimate = (f"estimated peak memory: supernet activations {facts.activation_mb:.0f} MiB for a batch, plus"
                f" {facts.bytes_per_scalar * facts.n_lower / 2**20:.1f} MiB per copy of the {facts.n_lower} weights")
    warnings: list[str] = []
    second_order = ("its virtual weight step w' = w - xi (mu m + grad_w L_train) lets the architecture gradient see how"
                    " the weights respond (first order ignores it and is biased: on the analytic toy it ends at alpha = 2, not 1)")
    if facts.lower_solver in ("sgd", "momentum") and memory["darts_second_order_exact"] <= budget:
        config: Any = DartsConfig(order=2, hessian="exact")
        reasons.append(
            f"second-order DARTS with the exact mixed product fits the {budget:.0f} MiB budget (about"
            f" {memory['darts_second_order_exact']:.0f} MiB; {estimate}): {second_order}; the mixed second derivative is"
            " one exact vector-Jacobian product, because the paper's central difference (radius 0.01) crosses ReLU kinks"
            " and was measured 100% off (cosine 0.66) on the digits supernet (docs/engines/darts.md)"
        )
    elif facts.lower_solver in ("sgd", "momentum") and memory["darts_second_order"] <= budget:
        config = DartsConfig(order=2)
        reasons.append(
            f"second-order DARTS fits the {budget:.0f} MiB budget (about {memory['darts_second_order']:.0f} MiB; {estimate}),"
            f" but not its exact mixed product (about {memory['darts_second_order_exact']:.0f} MiB): {second_order}; the"
            " mixed second derivative is a central finite difference of two gradients (as the paper), no double backward"
        )
    elif facts.lower_solver not in ("sgd", "momentum") and memory["rarts"] <= budget:
        config = RartsConfig()
        reasons.append(
            f"levels.{facts.lower_level}.solver.name = {facts.lower_solver}: DARTS's second-order virtual step is defined"
            " for sgd and momentum weight updates, so RARTS is used: first order (no mixed second derivatives), it"
            " trains a tied copy of the weights on the validation data and, unlike first-order DARTS, reaches the"
            f" bilevel optimum of the analytic toy as its coupling grows (about {memory['rarts']:.0f} MiB; {estimate})"
        )
    else:
        config = DartsConfig(order=1)
        reasons.append(
            f"second order does not fit the {budget:.0f} MiB budget (about {memory['darts_second_order']:.0f} MiB"
            f" against {memory['darts_first_order']:.0f} MiB for first order; {estimate}): first-order DARTS, the"
            " cheapest (one gradient for the weights, one for the architecture), biased where the weights' response matters"
        )
        if memory["darts_first_order"] > budget:
            warnings.append(
                f"even first-order DARTS needs about {memory['darts_first_order']:.0f} MiB, over the {budget:.0f} MiB budget:"
                " set the search space's partial_channels (PC-DARTS, e.g. 4) or lower the batch size"
            )
    return Plan(config, reasons, warnings, facts)


def _with_architecture_advice(plan: Plan, facts: ProblemFacts) -> Plan:
    caps = engine_capabilities().get(plan.engine.kind)
    if caps is None:
        return plan
    if facts.architecture and not caps.handles_architecture:
        advice = (f"levels.{facts.upper_level} declares architecture mixtures ({', '.join(facts.architecture)}), which the"
                  f" {plan.engine.kind} engine does not declare it handles; engines that do: "
                  + ", ".join(_able(lambda c: c.handles_architecture)))
    elif not facts.architecture and caps.handles_architecture:
        advice = (f"the {plan.engine.kind} engine alternates single weight and upper steps (architecture search);"
                  " on a problem without architecture variables it converges to its own fixed point, not necessarily"
                  " the bilevel solution")
    else:
        return plan
    return Plan(plan.engine, plan.reasons, [*plan.warnings, advice], plan.facts)
