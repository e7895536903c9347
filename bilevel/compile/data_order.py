"""The order of the levels' minibatches (``data.order``): paired lower levels are given the top
level's stream to take their indices from, and what pairing needs is checked (a top level with
data, the same number of examples)."""

from __future__ import annotations

from bilevel.problem import Problem
from bilevel.spec.errors import SpecIssue

__all__ = ["wire_data_order"]


def wire_data_order(problem: Problem) -> list[SpecIssue]:
    """Give every paired stream its leader (the top level's stream); the issues found."""
    source, top = problem.source, problem.chain[0]
    issues: list[SpecIssue] = []
    if top.data is not None and top.data.order == "paired":
        issues.append(source.issue(f"levels.{top.name}.data.order", "paired takes the top level's batch of each outer step;"
                                   " the top level itself draws one batch per outer step: use shuffled"))
    for level in problem.chain[1:]:
        if level.data is None or level.data.order != "paired":
            continue
        path = f"levels.{level.name}.data.order"
        if top.data is None:
            issues.append(source.issue(path, f"paired takes the indices of the top level's batches, and levels.{top.name}"
                                       " has no data"))
        elif top.data.size != level.data.size:
            issues.append(source.issue(path, f"paired takes the indices of the top level's batches: both data sets need the"
                                       f" same number of examples ({top.data.size} at levels.{top.name}, {level.data.size}"
                                       " here)"))
        else:
            level.data.leader = top.data
    return issues
