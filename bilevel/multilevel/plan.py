"""Planner rules for chains of more than two levels.

Only engines registered for chains (bilevel/multilevel/registry.py) qualify. Rules, in order:
an explicit engine wins (refused with the engines that can, if it cannot do chains; warned where
its assumptions contradict the declarations); a tuned optimizer lr or momentum -> nested
unrolling (the only engine that differentiates through optimizer steps); every lower level
strongly convex -> nested implicit differentiation with CG; otherwise nested unrolling, whose
memory (every step of the nest is stored) is estimated against the budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bilevel.multilevel.chain import ChainProblem
from bilevel.multilevel.registry import chain_engine_capabilities, chain_engine_class
from bilevel.planner import Plan, memory_budget_mb
from bilevel.spec.engine import AutoEngine, ImplicitConfig, LinearSolverSpec, UnrolledConfig
from bilevel.spec.errors import SpecError
from bilevel.spec.load import LoadedSpec

__all__ = ["ChainFacts", "plan_chain"]


@dataclass(frozen=True)
class ChainFacts:
    """What the planner knows about a chain: per level (top first) its name, size, inner steps
    and declared convexity, the tuned optimizer hyperparameters, and the memory budget."""

    levels: tuple[str, ...]
    sizes: tuple[int, ...]
    inner_steps: tuple[int, ...]
    """Steps per solve of each level (0 for the top)."""
    convexity: tuple[str, ...]
    tuned_step: tuple[str, ...]
    """Dotted paths of tuned lr / momentum (only unrolling differentiates them)."""
    steps_per_hypergradient: tuple[int, ...]
    """Optimizer steps each level takes for one hypergradient: level k's solve runs the levels
    below it once per step and once more at the end, so counts multiply down the chain."""
    unrolled_memory_mb: float
    """Rough graph memory of nested unrolling: every step stored, each with about four copies
    of its level's variables and activations the size of its batch."""
    memory_mb: float
    device: str

    @classmethod
    def of(cls, loaded: LoadedSpec, problem: ChainProblem) -> "ChainFacts":
        spec = loaded.spec
        names = problem.level_names
        steps = tuple(0 if k == 0 else level.solver.steps for k, level in enumerate(problem.chain))
        counts, runs = [0], 1
        for k in range(1, problem.depth):
            counts.append(runs * steps[k])
            runs *= steps[k] + 1
        bytes_per_scalar = torch.finfo(problem.dtype).bits // 8
        memory = 0.0
        for level, count in zip(problem.chain, counts):
            batch = 0
            if level.data is not None:
                size = level.data.batch_size or level.data.size
                batch = sum(v[0].numel() * size for v in level.data.full.values())
            memory += count * bytes_per_scalar * (4 * level.numel + batch) / 2**20
        tuned = tuple(
            f"levels.{name}.solver.tuned.{hyper}"
            for name in names[1:]
            for hyper in (spec.levels[name].solver.tuned if spec.levels[name].solver else {})
            if hyper != "weight_decay"
        )
        return cls(
            levels=names,
            sizes=tuple(level.numel for level in problem.chain),
            inner_steps=steps,
            convexity=tuple(spec.levels[name].assumptions.convexity for name in names),
            tuned_step=tuned,
            steps_per_hypergradient=tuple(counts),
            unrolled_memory_mb=memory,
            memory_mb=memory_budget_mb(loaded, problem.device),
            device=str(problem.device),
        )

    @property
    def chain(self) -> str:
        return " -> ".join(self.levels)


def plan_chain(loaded: LoadedSpec, problem: ChainProblem, requested: Any) -> Plan:
    """The engine for a chain, with reasons (see the module docstring for the rules)."""
    facts = ChainFacts.of(loaded, problem)
    first = (
        f"the levels form a chain of {len(facts.levels)}, {facts.chain}: each level is solved given the levels above"
        " it, and the top level's hypergradient goes through the solutions of every level below"
    )
    if not isinstance(requested, AutoEngine):
        return _explicit(requested, facts, loaded, first)
    if facts.tuned_step:
        reason = (f"{', '.join(facts.tuned_step)} change the path of the inner optimizer but not the solution it reaches:"
                  " only nested unrolling, which differentiates through every optimizer step, gives them a hypergradient")
        return _unrolled(facts, [first, reason])
    weak = [f"levels.{name}.assumptions.convexity = {conv}" for name, conv in zip(facts.levels[1:], facts.convexity[1:])
            if conv != "strongly_convex"]
    if not weak:
        return _implicit(facts, first)
    reason = (f"{'; '.join(weak)}: nested implicit differentiation needs every lower level strongly convex (each solution"
              " unique, each reduced Hessian invertible), so the hypergradient is taken through the optimizers of all"
              " levels (nested unrolling), the exact derivative of what they compute")
    return _unrolled(facts, [first, reason])


def _implicit(facts: ChainFacts, first: str) -> Plan:
    lower = ", ".join(f"levels.{name}" for name in facts.levels[1:])
    default = LinearSolverSpec()
    largest = max(facts.sizes[1:])
    maxiter = min(default.maxiter, largest)
    config = ImplicitConfig(linear_solver=LinearSolverSpec(method="cg", maxiter=maxiter))
    exact = " (at least the size of the largest lower level, so CG is exact in exact arithmetic)" if maxiter == largest else ""
    reasons = [
        first,
        f"{lower} all declare convexity = strongly_convex: implicit differentiation applies level by level (nested"
        " implicit engine); each middle level's Hessian-vector products differentiate through the implicit derivatives"
        " of the levels below it (third-order products, no Hessian formed), with memory independent of the inner steps",
        f"each linear system is solved by CG with {maxiter} iterations{exact}; one hypergradient costs"
        f" {_steps(facts)} inner optimizer steps and, for the top level's gradient, about {maxiter}^{len(facts.levels) - 1}"
        " products",
    ]
    return Plan(config, reasons, [], facts)


def _unrolled(facts: ChainFacts, reasons: list[str]) -> Plan:
    memory = (f"nested unrolling stores every step of the nest ({_steps(facts)} steps per hypergradient), about"
              f" {facts.unrolled_memory_mb:.3g} MiB")
    warnings = []
    if facts.unrolled_memory_mb <= facts.memory_mb:
        reasons = [*reasons, f"{memory}, within the {facts.memory_mb:.0f} MiB budget"]
    else:
        reasons = [*reasons, f"{memory}, over the {facts.memory_mb:.0f} MiB budget"]
        warnings.append(f"nested unrolling needs about {facts.unrolled_memory_mb:.0f} MiB, over run.budget.memory_mb ="
                        f" {facts.memory_mb:.0f}: lower the inner steps (levels.<name>.solver.steps); checkpointing and"
                        " truncation are not available for chains")
    return Plan(UnrolledConfig(), reasons, warnings, facts)


def _steps(facts: ChainFacts) -> str:
    parts = [f"{count} at {name}" for name, count in zip(facts.levels[1:], facts.steps_per_hypergradient[1:])]
    return f"{sum(facts.steps_per_hypergradient)} ({', '.join(parts)})"


def _explicit(requested: Any, facts: ChainFacts, loaded: LoadedSpec, first: str) -> Plan:
    kind = requested.kind
    able = chain_engine_capabilities()
    if kind not in able:
        raise loaded.error("engine.kind", f"the {kind} engine solves two-level problems, and this spec has {len(facts.levels)}"
                           f" levels ({facts.chain}); engines for more than two levels: {', '.join(able)}")
    unsupported = chain_engine_class(kind).unsupported(requested)
    if unsupported:
        raise SpecError([loaded.issue(f"engine.{field}", why) for field, why in unsupported.items()])
    caps = able[kind]
    warnings = []
    for name, convexity in zip(facts.levels[1:], facts.convexity[1:]):
        if convexity not in caps.lower_convexity:
            warnings.append(f"the {kind} engine assumes lower levels that are {' or '.join(caps.lower_convexity)}, but"
                            f" levels.{name}.assumptions.convexity = {convexity}: its hypergradient may be wrong")
    if facts.tuned_step and not caps.through_optimizer:
        warnings.append(f"{', '.join(facts.tuned_step)} are not differentiated by the {kind} engine (it does not go"
                        " through the optimizer's steps): their hypergradient will be zero")
    reasons = [first, f"engine {kind!r} requested explicitly in the spec or on the command line (nested {kind} engine)"]
    if kind == "unrolled":
        plan = _unrolled(facts, reasons)
        return Plan(requested, plan.reasons, [*warnings, *plan.warnings], facts)
    return Plan(requested, reasons, warnings, facts)
