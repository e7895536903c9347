"""The planner: from what a compiled problem declares to an engine configuration, with reasons.

* :mod:`~bilevel.planner.facts`: what the planner knows (from the Problem alone);
* :mod:`~bilevel.planner.rules`: situations in order of priority, admitting engines by capability;
* :mod:`~bilevel.planner.plan`: ``make_plan(problem, requested) -> Plan``."""

from __future__ import annotations

from bilevel.planner.facts import DEFAULT_CPU_MEMORY_MB, ProblemFacts, memory_budget_mb
from bilevel.planner.plan import Plan, make_plan
from bilevel.planner.rules import RULES, Rule

__all__ = ["DEFAULT_CPU_MEMORY_MB", "RULES", "Plan", "ProblemFacts", "Rule", "make_plan", "memory_budget_mb"]
