"""From a compiled problem to an engine configuration, with reasons.

An explicit engine always wins: the planner then only refuses what it cannot solve and warns
where its assumptions contradict the declared facts. Otherwise the rules of
``bilevel.planner.rules`` choose among the registered engines by their capabilities and
priorities, and the chosen engine words its configuration and reasons (``Engine.configure``).
The planner names no engine. A lower solver declared ``auto`` is then chosen for that engine
(``bilevel.planner.inner_solver``); ``Plan.applied`` puts it in the problem."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from bilevel.engines.base import Proposal
from bilevel.engines.capabilities import Capabilities
from bilevel.engines.registry import engine_capabilities, engine_class, engine_config, engines_by_priority
from bilevel.planner.facts import ProblemFacts
from bilevel.planner.inner_solver import choose_inner_solver, inner_solver_refusals
from bilevel.planner.rules import RULES, admitted
from bilevel.problem import Problem
from bilevel.spec.engine import AutoEngine
from bilevel.spec.errors import SpecError, SpecSource
from bilevel.spec.optimizer import OptimizerSpec

__all__ = ["Plan", "make_plan"]


@dataclass(frozen=True)
class Plan:
    """The chosen engine configuration and why."""

    engine: Any
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)
    facts: ProblemFacts | None = None
    inner_solver: OptimizerSpec | None = None
    """What the lower level's ``solver: {name: auto}`` became (None: the spec's solver as declared);
    ``applied`` puts it in the problem."""

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine.kind,
            "config": self.engine.model_dump(mode="json"),
            "inner_solver": None if self.inner_solver is None else self.inner_solver.model_dump(mode="json"),
            "reasons": self.reasons,
            "warnings": self.warnings,
            "facts": None if self.facts is None else asdict(self.facts),
        }

    def applied(self, problem: Problem) -> Problem:
        """``problem`` with the inner solver this plan chose (a new Problem; the same one without)."""
        if self.inner_solver is None:
            return problem
        name = problem.chain[1].name
        levels = {**problem.levels, name: dataclasses.replace(problem.levels[name], solver=self.inner_solver)}
        return dataclasses.replace(problem, levels=levels)


def make_plan(problem: Problem, requested: Any | None = None) -> Plan:
    """Choose an engine for ``problem``; ``requested`` (an engine config, a mapping or a kind's
    name; default: the spec's ``engine``) overrides the planner unless it is auto."""
    requested = engine_config(requested if requested is not None else problem.engine)
    facts = ProblemFacts.of(problem)
    source = problem.source
    if isinstance(requested, AutoEngine):
        proposal = _choose(facts, source)
    else:
        proposal = _explicit(requested, facts, source)
    _refuse(proposal.config, facts, source)
    reasons, warnings = proposal.reasons, proposal.warnings
    if facts.depth > 2 and facts.is_chain:
        reasons = [f"the levels form a chain of {facts.depth}, {facts.chain}: each level is solved given the levels above"
                   " it, and the top level's hypergradient goes through the solutions of every level below", *reasons]
    elif facts.depth > 2:
        reasons = [f"the levels form a tree of {facts.depth}, {facts.chain}: each level is solved given its ancestors, and"
                   " a level's hypergradient is the sum of its children's contributions, each through the solutions of"
                   " its subtree", *reasons]
    kind = proposal.config.kind
    caps = engine_capabilities()[kind]
    inner = None
    if facts.lower_solver == "auto":
        inner, why = choose_inner_solver(facts, kind, caps, problem.chain[1].solver)
        reasons = [*reasons, *why]
    return Plan(proposal.config, reasons, [*warnings, *_advice(caps, kind, facts)], facts, inner)


def _able(predicate: Any) -> list[str]:
    return [kind for kind, caps in engine_capabilities().items() if predicate(caps)]


def _choose(facts: ProblemFacts, source: SpecSource) -> Proposal:
    """The proposal of the first rule that applies and that an admitted engine takes."""
    for rule in RULES:
        if not rule.applies(facts):
            continue
        for cls in engines_by_priority():
            if admitted(cls.capabilities, facts) and rule.admits(cls.capabilities, facts):
                proposal = cls.configure(facts, rule.situation)
                if proposal is None:
                    continue
                accepted = cls.capabilities.lower_convexity
                if rule.warn_convexity and facts.lower_convexity not in accepted:
                    proposal.warnings.append(f"{cls.kind} assumes a lower level that is {' or '.join(accepted)};"
                                             f" levels.{facts.lower_level}.assumptions.convexity = {facts.lower_convexity}")
                return proposal
        if rule.unmet is not None:
            raise source.error(*rule.unmet(facts))
    raise source.error("engine", "no registered engine applies to this problem")


def _explicit(requested: Any, facts: ProblemFacts, source: SpecSource) -> Proposal:
    kind = requested.kind
    caps = engine_capabilities().get(kind)
    if caps is None:
        raise source.error("engine.kind", f"no engine {kind!r} is registered; available: {', '.join(engine_capabilities())}")
    if not caps.solves_depth(facts.depth):
        able = ", ".join(_able(lambda c: c.solves_depth(facts.depth)))
        raise source.error("engine.kind", f"the {kind} engine solves two-level problems, and this spec has {facts.depth}"
                           f" levels ({facts.chain}); engines for more than two levels: {able}")
    path = f"levels.{facts.lower_level}.constraints"
    if facts.constraints and not caps.handles_constraints:
        raise source.error(path, f"the {kind} engine cannot handle lower-level constraints ({facts.constraints} declared);"
                           f" engines that can: {', '.join(_able(lambda c: c.handles_constraints)) or 'none'}")
    if facts.coupled_constraints and not caps.handles_coupled_constraints:
        raise source.error(path, f"the {kind} engine cannot handle constraints coupling both levels")
    warnings = _contradictions(kind, caps, facts)
    nested = f" (nested {kind} engine)" if facts.depth > 2 else ""
    explained = engine_class(kind).explain(requested, facts)
    return Proposal(requested, [f"engine {kind!r} requested explicitly in the spec or on the command line{nested}",
                                *explained.reasons], [*warnings, *explained.warnings])


def _contradictions(kind: str, caps: Capabilities, facts: ProblemFacts) -> list[str]:
    """Where an explicitly requested engine's assumptions contradict the declared facts."""
    warnings = []
    if facts.depth > 2:
        for name, convexity in zip(facts.levels[1:], facts.lower_convexities):
            if convexity not in caps.lower_convexity:
                warnings.append(f"the {kind} engine assumes lower levels that are {' or '.join(caps.lower_convexity)}, but"
                                f" levels.{name}.assumptions.convexity = {convexity}: its hypergradient may be wrong")
        if facts.tuned_step_paths and not caps.through_optimizer:
            warnings.append(f"{', '.join(facts.tuned_step_paths)} are not differentiated by the {kind} engine (it does not go"
                            " through the optimizer's steps): their hypergradient will be zero")
        return warnings
    if facts.tuned_step and not caps.through_optimizer:
        warnings.append(
            f"levels.{facts.lower_level}.solver.tuned names {', '.join(facts.tuned_step)}, which the {kind} engine does not"
            " differentiate (it does not go through the optimizer's steps): their hypergradient will be zero"
        )
    if facts.lower_convexity not in caps.lower_convexity:
        warnings.append(
            f"the {kind} engine assumes a lower level that is {' or '.join(caps.lower_convexity)}, but"
            f" levels.{facts.lower_level}.assumptions.convexity = {facts.lower_convexity}: its hypergradient may be wrong"
        )
    if facts.closed_form and caps.through_optimizer and not caps.derivative_free:
        warnings.append(
            f"levels.{facts.lower_level}.solution solves the lower level in closed form, but the {kind} engine"
            " differentiates the inner solver's steps (started from that solution); the implicit engine is exact here"
        )
    return warnings


def _refuse(config: Any, facts: ProblemFacts, source: SpecSource) -> None:
    """Every way the chosen config cannot solve the problem: hyperparameters no gradient reaches
    for an engine that needs gradients, a batch of instances it would couple, and the engine's
    own refusals; one SpecError listing them all."""
    kind = config.kind
    caps = engine_capabilities()[kind]
    issues = []
    if not caps.handles_discrete:
        able = ", ".join(_able(lambda c: c.handles_discrete)) or "none"
        upper = f"levels.{facts.upper_level}.variables"
        issues += [source.issue(f"{upper}.{name}",
                                f"the {kind} engine cannot take this hyperparameter"
                                f" ({'discrete' if name in facts.discrete_hyperparameters else 'declared differentiable: false'}):"
                                " it needs gradients of the objectives in the upper variables, and none reaches it; engines"
                                f" that can: {able} (or leave engine: auto)")
                   for name in facts.gradient_free_hyperparameters]
    if facts.instances and not caps.handles_instances and not (facts.blocks and caps.samples_blocks):
        what, path = (("tasks", "tasks") if facts.tasks else ("blocks", facts.blocks_path) if facts.blocks
                      else ("instances", "instances"))
        issues.append(source.issue(path, f"the {kind} engine does not support a batch of {what}; engines that do:"
                                         f" {', '.join(_able(lambda c: c.handles_instances))}"))
    if facts.prox_operators and not caps.handles_prox_operators:
        issues.append(source.issue(facts.prox_operators[0], f"the {kind} engine does not differentiate proximal terms (its"
                                   " formulas see the smooth objective only); engines that do:"
                                   f" {', '.join(_able(lambda c: c.handles_prox_operators))}"))
    if facts.init_from and not caps.differentiates_start:
        issues.append(source.issue(facts.init_from[0], f"the {kind} engine does not differentiate a lower solve started at"
                                   " upper variables (it would drop the meta-gradient through the start); engines that do:"
                                   f" {', '.join(_able(lambda c: c.differentiates_start))}"))
    if facts.blocks_sampled and not caps.samples_blocks:
        issues.append(source.issue(facts.blocks_path + ".sample", f"the {kind} engine solves a level of blocks only with"
                                   f" every block drawn (sample = count = {facts.blocks}); it keeps no per-block state"
                                   " between draws. Engines that sample blocks:"
                                   f" {', '.join(_able(lambda c: c.samples_blocks)) or 'none'}"))
    issues += [source.issue(path, why) for path, why in inner_solver_refusals(facts, kind, caps)]
    issues += [source.issue(path, why) for path, why in engine_class(kind).refusals(config, facts)]
    if issues:
        raise SpecError(issues)


def _advice(caps: Capabilities, kind: str, facts: ProblemFacts) -> list[str]:
    """Warnings on settings the engine is not defined with: the upper optimizer, architecture variables."""
    out = []
    if caps.outer_optimizer is not None and caps.outer_optimizer != facts.outer_optimizer:
        out.append(f"the {kind} engine is defined with the upper-level optimizer {caps.outer_optimizer!r}, but"
                   f" levels.{facts.upper_level}.solver.name = {facts.outer_optimizer!r}")
    if facts.architecture and not caps.handles_architecture:
        out.append(f"levels.{facts.upper_level} declares architecture mixtures ({', '.join(facts.architecture)}), which the"
                   f" {kind} engine does not declare it handles; engines that do: "
                   + ", ".join(_able(lambda c: c.handles_architecture)))
    elif not facts.architecture and caps.handles_architecture:
        out.append(f"the {kind} engine alternates single weight and upper steps (architecture search);"
                   " on a problem without architecture variables it converges to its own fixed point, not necessarily"
                   " the bilevel solution")
    return out
