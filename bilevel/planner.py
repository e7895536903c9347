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
from bilevel.spec.load import LoadedSpec

__all__ = ["Plan", "ProblemFacts", "make_plan"]

DEFAULT_CPU_MEMORY_MB = 4096.0


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
        budget = spec.run.budget.memory_mb
        if budget is None:
            if problem.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(problem.device)
                budget = 0.8 * free / 2**20
            else:
                budget = DEFAULT_CPU_MEMORY_MB
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
    return Plan(requested, [f"engine {kind!r} requested explicitly in the spec or on the command line"], warnings, facts)


def make_plan(loaded: LoadedSpec, problem: Problem, requested: Any | None = None) -> Plan:
    """Choose an engine for ``problem``; ``requested`` (or the spec's engine) overrides unless auto.

    Rules, in order: declared constraints -> an engine that handles them; unbounded upper
    smoothness -> an engine designed for it; strongly convex lower level -> implicit; nonconvex
    lower level -> a first-order penalty engine; otherwise unrolled, checkpointed or truncated to
    fit the memory budget."""
    facts = ProblemFacts.of(loaded, problem)
    requested = requested if requested is not None else loaded.spec.engine
    if not isinstance(requested, AutoEngine):
        plan = _explicit(requested, facts, loaded)
    else:
        for rule in (_constrained, _tuned_optimizer, _unbounded_smoothness, _strongly_convex, _nonconvex, _unrolled):
            plan = rule(facts, loaded)
            if plan is not None:
                break
    _check_instances(plan, facts, loaded)
    return _with_outer_optimizer_advice(plan, facts)


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
