"""The planner's rules: situations a problem can be in, in order of priority.

Each rule names a situation (a fact of the problem that decides the kind of method), when it
applies, and which engines it admits, by their capabilities alone. For the first rule that
applies and has an admitted engine willing to take it (``Engine.configure(facts, situation)``
returns a proposal), that proposal is the plan; engines a rule admits are asked in the order of
their declared ``priority``, which the registry keeps distinct, so no choice ever depends on an
engine's name. A rule with ``unmet`` is a requirement: when no engine takes it, planning stops
with that error instead of trying the next rule.

    priority  situation             applies when                               admits engines that
    90        architecture          upper architecture mixtures                handle architecture mixtures
    85        sampled_blocks        k of m lower blocks drawn per step         sample blocks
    80        constraints           lower-level constraints                    handle (coupled) constraints
    70        gradient_free         discrete / non-differentiable upper vars   handle discrete variables
    60        closed_form           a closed-form lower solution               are exact when converged
    56        initialization        lower solves start at upper vars (no prox) go through the optimizer
    55        online_tuned_step     a tuned inner lr / momentum, at most       go through the optimizer in memory
                                    16 upper scalars, at least 100 inner       independent of the horizon
                                    steps per solve (two levels)
    50        tuned_step            a tuned inner lr / momentum                go through the optimizer
    40        unbounded_smoothness  upper smoothness unbounded                 are designed for it (convexity accepted)
    30        strongly_convex       every lower level strongly convex          are exact when converged there
    20        nonconvex             a nonconvex lower level                    are first order and accept it
    0         fallback              always                                     go through the optimizer (convexity accepted)

Every rule also requires an engine that solves the problem's depth, for a batch of instances
keeps the instances apart, for a lower level with proximal terms differentiates them, and for
a lower level started at upper variables (init_from) differentiates that start, and for a level
of blocks drawn k of m per step samples blocks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bilevel.engines.capabilities import Capabilities
from bilevel.planner.facts import ProblemFacts

__all__ = ["FEW_UPPER_SCALARS", "LONG_HORIZON", "RULES", "Rule", "admitted"]

FEW_UPPER_SCALARS = 16
"""Upper scalars up to which forward mode's one Jacobian-vector product per scalar and step is cheap."""
LONG_HORIZON = 100
"""Inner steps per solve from which storing every step (reverse mode) costs more than forward
mode's tangents (one copy of the lower state per upper scalar)."""


@dataclass(frozen=True)
class Rule:
    """A situation, when it applies, which capabilities it admits, and (for requirements) the
    error when no engine takes it: unmet(facts) -> (dotted spec path, message)."""

    situation: str
    priority: int
    applies: Callable[[ProblemFacts], bool]
    admits: Callable[[Capabilities, ProblemFacts], bool]
    unmet: Callable[[ProblemFacts], tuple[str, str]] | None = None
    warn_convexity: bool = False
    """Admit engines whatever the declared convexity, warning where it is not one they assume."""


def _accepts_convexity(caps: Capabilities, facts: ProblemFacts) -> bool:
    return all(convexity in caps.lower_convexity for convexity in facts.lower_convexities)


def admitted(caps: Capabilities, facts: ProblemFacts) -> bool:
    """What every rule requires of an engine: the problem's depth, and a batch of instances kept apart."""
    return (caps.solves_depth(facts.depth)
            and (not facts.instances or caps.handles_instances or (bool(facts.blocks) and caps.samples_blocks))
            and (not facts.prox_operators or caps.handles_prox_operators)
            and (not facts.init_from or caps.differentiates_start)
            and (not facts.blocks_sampled or caps.samples_blocks))


RULES: tuple[Rule, ...] = tuple(sorted((
    Rule("architecture", 90, lambda f: bool(f.architecture), lambda c, f: c.handles_architecture),
    Rule("constraints", 80, lambda f: f.constraints > 0,
         lambda c, f: c.handles_constraints and (c.handles_coupled_constraints or not f.coupled_constraints),
         lambda f: (f"levels.{f.lower_level}.constraints", "no registered engine handles these lower-level constraints"),
         warn_convexity=True),
    Rule("gradient_free", 70, lambda f: bool(f.gradient_free_hyperparameters),
         lambda c, f: c.handles_discrete and not c.handles_constraints,
         lambda f: (f"levels.{f.upper_level}.variables.{f.gradient_free_hyperparameters[0]}",
                    "no registered engine handles discrete or non-differentiable hyperparameters")),
    Rule("sampled_blocks", 85, lambda f: bool(f.blocks_sampled), lambda c, f: c.samples_blocks,
         lambda f: (f.blocks_path + ".sample", "no registered engine samples blocks")),
    Rule("closed_form", 60, lambda f: f.closed_form, lambda c, f: c.exact_when_converged),
    Rule("initialization", 56, lambda f: bool(f.init_from) and not f.prox, lambda c, f: c.through_optimizer),
    Rule("online_tuned_step", 55,
         lambda f: bool(f.tuned_step) and f.depth == 2 and f.n_upper <= FEW_UPPER_SCALARS and f.inner_steps >= LONG_HORIZON,
         lambda c, f: c.through_optimizer and c.memory == "constant"),
    Rule("tuned_step", 50, lambda f: bool(f.tuned_step_paths), lambda c, f: c.through_optimizer),
    Rule("unbounded_smoothness", 40, lambda f: f.upper_smoothness == "unbounded",
         lambda c, f: c.unbounded_smoothness and _accepts_convexity(c, f)),
    Rule("strongly_convex", 30, lambda f: all(c == "strongly_convex" for c in f.lower_convexities),
         lambda c, f: c.exact_when_converged and "strongly_convex" in c.lower_convexity),
    Rule("nonconvex", 20, lambda f: "nonconvex" in f.lower_convexities,
         lambda c, f: c.first_order and "nonconvex" in c.lower_convexity and not c.handles_constraints),
    Rule("fallback", 0, lambda f: True, lambda c, f: c.through_optimizer and _accepts_convexity(c, f),
         lambda f: (f"levels.{f.lower_level}.assumptions.convexity",
                    f"no registered engine accepts a {f.lower_convexity} lower level")),
), key=lambda rule: -rule.priority))
