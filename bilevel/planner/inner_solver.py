"""The lower level's inner solver: what ``solver: {name: auto}`` becomes, with reasons, and what
an explicit L-BFGS, Newton-CG or residual stop (``solver.tol``) cannot be used with.

An explicit solver always wins; auto chooses from the declared facts and the chosen engine:

    the engine steps through the optimizer (not solution_only)         sgd (lr, steps as declared)
    not declared strongly_convex with smoothness bounded, or the level
    has sets, proximal terms, constraints, minibatches, instances,
    a closed form, or more than two levels                             sgd
    at most NEWTON_CG_SIZE lower scalars                               newton_cg, stopped at tol
    more                                                               lbfgs, stopped at tol

Strong convexity with a Lipschitz gradient is what both methods' convergence rests on (Nocedal &
Wright 2006, Theorems 6.5 / 7.2 for L-BFGS's R-linear rate, 7.2 for Newton-CG's superlinear
one); a small level affords Newton-CG's Hessian-vector products (a CG of at most
``cg_maxiter`` products per step, quadratic convergence near the solution), a larger one
L-BFGS's one gradient per iteration. Without a declared tolerance auto stops at AUTO_TOL (per
dtype): an absolute ||grad_y G||, so a problem whose objective is scaled far from 1 should
declare its own."""

from __future__ import annotations

from bilevel.engines.capabilities import Capabilities
from bilevel.planner.facts import ProblemFacts
from bilevel.spec.optimizer import SECOND_ORDER, OptimizerSpec

__all__ = ["AUTO_TOL", "NEWTON_CG_SIZE", "choose_inner_solver", "inner_solver_refusals"]

NEWTON_CG_SIZE = 1000
"""Lower scalars up to which auto picks Newton-CG (above: L-BFGS)."""
AUTO_TOL = {4: 1e-5, 8: 1e-9}
"""auto's residual stop without a declared tol, by bytes per scalar (float32: a few hundred ulps
of a unit-scale gradient; float64: well below what the hypergradient needs)."""


def _obstacle(facts: ProblemFacts) -> str | None:
    """Why the level admits no second-order solver or residual stop (None: it does)."""
    lower = f"levels.{facts.lower_level}"
    if facts.depth > 2:
        return f"the problem has {facts.depth} levels: L-BFGS, Newton-CG and residual stops solve two-level problems"
    if facts.closed_form:
        return f"{lower}.solution solves the lower level in closed form"
    if facts.lower_sets or facts.prox_operators:
        return f"{', '.join([*facts.lower_sets, *facts.prox_operators])}: a projected / proximal step is not a smooth minimizer's"
    if facts.constraints:
        return f"{lower}.constraints: the level is constrained"
    if facts.instances:
        return "a batch of instances: one line search (and one stopping test) would couple them"
    if facts.lower_minibatched:
        return f"{lower}.data draws minibatches: the objective changes from step to step, so neither a line search nor a residual stop applies"
    return None


def inner_solver_refusals(facts: ProblemFacts, kind: str, caps: Capabilities) -> list[tuple[str, str]]:
    """(dotted path, why) for an explicit lbfgs / newton_cg, tol or extrapolate the problem or engine cannot take."""
    name, tol = facts.lower_solver, facts.inner_tol
    refused = _extrapolation_refusals(facts, kind, caps)
    if refused or (name not in SECOND_ORDER and tol is None):
        return refused
    solver = f"levels.{facts.lower_level}.solver"
    path = f"{solver}.name" if name in SECOND_ORDER else f"{solver}.tol"
    what = f"the inner solver {name}" if name in SECOND_ORDER else "a residual stop (tol)"
    if not caps.solution_only:
        return [(path, f"the {kind} engine differentiates or runs the inner optimizer's own steps, which {what} does not"
                       " provide (only its solution is defined); use sgd, momentum or adam with a fixed number of steps,"
                       " or an engine that uses the lower solution alone (implicit)")]
    obstacle = _obstacle(facts)
    if obstacle is not None:
        return [(path, f"{what} is not available here: {obstacle}")]
    return []


def _extrapolation_refusals(facts: ProblemFacts, kind: str, caps: Capabilities) -> list[tuple[str, str]]:
    if not facts.inner_extrapolate:
        return []
    path = f"levels.{facts.lower_level}.solver.extrapolate"
    if not facts.inner_warm_start:
        return [(path, "the secant prediction starts from the previous solutions, so it needs warm_start: true")]
    if facts.lower_solver != "auto" and facts.inner_tol is None:
        return [(path, "a predicted start would change the result of a fixed number of steps; it needs a residual stop"
                       f" (levels.{facts.lower_level}.solver.tol), whose solution it does not change")]
    if not caps.solution_only:
        return [(path, f"the {kind} engine differentiates or runs the inner optimizer's own steps from their start;"
                       " only an engine that uses the lower solution alone (implicit) takes a predicted start")]
    if facts.depth > 2 or facts.init_from or facts.instances:
        return [(path, "a predicted start is for a two-level problem warm-started from its own previous solutions"
                       " (not a chain of levels, a start at upper variables, or a batch of instances)")]
    return []


def choose_inner_solver(facts: ProblemFacts, kind: str, caps: Capabilities, spec: OptimizerSpec
                        ) -> tuple[OptimizerSpec, list[str]]:
    """What ``solver: {name: auto}`` is for this problem and engine, and why."""
    where = f"levels.{facts.lower_level}.solver.name = auto"
    first_order = spec.model_copy(update={"name": "sgd", "extrapolate": False})  # a predicted start needs a residual stop
    if not caps.solution_only:
        return first_order, [f"{where}: the {kind} engine goes through the optimizer's steps, so the inner solver is sgd"
                             f" (lr {spec.lr}, {spec.steps} steps)"]
    obstacle = _obstacle(facts)
    if obstacle is None and (facts.lower_convexity != "strongly_convex" or facts.lower_smoothness != "bounded"):
        obstacle = (f"L-BFGS and Newton-CG need a strongly convex lower level with a Lipschitz gradient; declared: convexity ="
                    f" {facts.lower_convexity}, smoothness = {facts.lower_smoothness}")
    if obstacle is not None:
        return first_order, [f"{where}: sgd (lr {spec.lr}, {spec.steps} steps), since {obstacle}"]
    tol = spec.tol if spec.tol is not None else AUTO_TOL.get(facts.bytes_per_scalar, 1e-5)
    told = "declared" if spec.tol is not None else f"auto's default for {8 * facts.bytes_per_scalar}-bit floats"
    on_cuda = facts.device.startswith("cuda")
    small = facts.n_lower <= NEWTON_CG_SIZE
    name = "newton_cg" if small else "lbfgs"
    check_every = 0 if on_cuda else (1 if small else spec.check_every)
    extrapolate = spec.extrapolate if "extrapolate" in spec.model_fields_set else spec.warm_start
    chosen = spec.model_copy(update={"name": name, "tol": tol, "check_every": check_every, "extrapolate": extrapolate})
    basis = (f"{where}: the lower level is declared strongly_convex with a bounded smoothness (a Lipschitz gradient), and"
             f" the {kind} engine uses only its solution, so it is minimized to the residual ||grad_y G|| <= {tol:g} ({told})"
             f" instead of taking {spec.steps} fixed steps (at most {spec.steps} iterations)")
    if small:
        size = (f"{facts.n_lower} lower scalars (<= {NEWTON_CG_SIZE}): Newton-CG, each step a CG of at most"
                f" {spec.cg_maxiter} Hessian-vector products, converges quadratically near the solution")
    else:
        size = (f"{facts.n_lower} lower scalars (> {NEWTON_CG_SIZE}): L-BFGS with {spec.history} curvature pairs, one"
                " gradient per iteration, no Hessian-vector products")
    reading = ("on CUDA the stop is never read on the host (check_every 0: a static shape the fast path can capture)"
               if on_cuda else f"the stop is read on the host every {check_every} iteration{'s' if check_every != 1 else ''}")
    why = [basis, f"{size}; {reading}"]
    if extrapolate:
        why.append("each solve starts at the secant prediction y_t + (y_t - y_{t-1}) of the next lower solution"
                   " (solver.extrapolate): it ends at the same tolerance, in fewer iterations along a smooth path")
    return chosen, why
