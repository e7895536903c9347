"""How the unrolled engine configures itself for a problem (``UnrolledEngine.configure``): which
situations it takes, its memory model (all steps stored, checkpointed every sqrt(T), or truncated
to what fits the budget) and its reasons."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bilevel.engines.base import Proposal

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["propose", "with_nested_memory"]


def propose(facts: ProblemFacts, situation: str, config: type) -> Proposal | None:
    """The unrolled engine's configuration (of class ``config``) for a tuned optimizer step, a
    lower level started at upper variables (MAML) or the planner's fallback; None for other
    situations."""
    if situation == "tuned_step":
        return _tuned_step(facts, config)
    if situation == "initialization":
        paths = ", ".join(facts.init_from)
        return _fitted(facts, config, [
            f"{paths}: the lower level starts its solve at upper variables and is tied to them by nothing else the"
            " implicit function theorem sees (no prox): the solution it converges to does not depend on where it"
            " starts, so implicit differentiation gives no meta-gradient through the start; differentiating through"
            f" the inner steps ({facts.inner_steps}) from it (unrolled: MAML, Finn et al. 2017) does"])
    if situation != "fallback":
        return None
    if facts.depth > 2:
        weak = [f"levels.{name}.assumptions.convexity = {conv}" for name, conv in zip(facts.levels[1:], facts.convexity[1:])
                if conv != "strongly_convex"]
        reason = (f"{'; '.join(weak)}: nested implicit differentiation needs every lower level strongly convex (each"
                  " solution unique, each reduced Hessian invertible), so the hypergradient is taken through the"
                  " optimizers of all levels (nested unrolling), the exact derivative of what they compute")
        return with_nested_memory(Proposal(config(), [reason]), facts)
    reason = (f"levels.{facts.lower_level}.assumptions.convexity = {facts.lower_convexity}: the implicit function theorem"
              " needs a strongly convex lower level, so the hypergradient is taken through the inner optimizer itself"
              " (unrolled), which is the exact derivative of what the inner solver computes")
    return _fitted(facts, config, [reason])


def _tuned_step(facts: ProblemFacts, config: type) -> Proposal:
    if facts.depth > 2:
        reason = (f"{', '.join(facts.tuned_step_paths)} change the path of the inner optimizer but not the solution it"
                  " reaches: only nested unrolling, which differentiates through every optimizer step, gives them a hypergradient")
        return with_nested_memory(Proposal(config(), [reason]), facts)
    reason = (
        f"levels.{facts.lower_level}.solver.tuned names {', '.join(facts.tuned_step)}: these change the path of the inner"
        " optimizer but not the lower solution it converges to, so only differentiating through the optimizer's"
        " steps (unrolled) gives them a hypergradient"
    )
    return _fitted(facts, config, [reason])


def _fitted(facts: ProblemFacts, config: type, reasons: list[str]) -> Proposal:
    """All T steps stored if they fit the memory budget; else checkpointed every sqrt(T); else
    truncated to what fits."""
    steps = facts.inner_steps
    full = facts.unrolled_memory_mb(steps)
    if full <= facts.memory_mb:
        return Proposal(config(), [*reasons, f"storing all {steps} inner steps needs about {full:.0f} MiB, within"
                                                      f" the {facts.memory_mb:.0f} MiB budget"])
    every = max(1, int(math.ceil(math.sqrt(steps))))
    stored = math.ceil(steps / every) + every
    checkpointed = facts.unrolled_memory_mb(stored)
    if checkpointed <= facts.memory_mb:
        return Proposal(config(checkpoint_every=every), [
            *reasons,
            f"storing all {steps} inner steps needs about {full:.0f} MiB, over the {facts.memory_mb:.0f} MiB budget:"
            f" checkpointing every {every} steps keeps about {checkpointed:.0f} MiB at the cost of one extra forward pass"])
    per_step = facts.unrolled_memory_mb(1)
    keep = max(1, int(facts.memory_mb // max(per_step, 1e-9)))
    truncated = config(truncate=min(keep, steps))
    return Proposal(truncated, [
        *reasons,
        f"even checkpointed, {steps} inner steps exceed the {facts.memory_mb:.0f} MiB budget: differentiating"
        f" through the last {truncated.truncate} steps only (truncated, biased)"])


def with_nested_memory(proposal: Proposal, facts: ProblemFacts) -> Proposal:
    """Nested unrolling's memory estimate against the budget, as a reason (and a warning over it)."""
    memory = (f"nested unrolling stores every step of the nest ({facts.nested_steps()} steps per hypergradient), about"
              f" {facts.nested_unrolled_memory_mb:.3g} MiB")
    if facts.nested_unrolled_memory_mb <= facts.memory_mb:
        return Proposal(proposal.config, [*proposal.reasons, f"{memory}, within the {facts.memory_mb:.0f} MiB budget"],
                        proposal.warnings)
    warning = (f"nested unrolling needs about {facts.nested_unrolled_memory_mb:.0f} MiB, over run.budget.memory_mb ="
               f" {facts.memory_mb:.0f}: lower the inner steps (levels.<name>.solver.steps); checkpointing and"
               " truncation are not available for chains")
    return Proposal(proposal.config, [*proposal.reasons, f"{memory}, over the {facts.memory_mb:.0f} MiB budget"],
                    [*proposal.warnings, warning])
