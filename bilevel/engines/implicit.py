"""Implicit differentiation (IFT) of the lower solution.

If y*(x) solves grad_y G(x, y) = 0 and H = grad^2_yy G(x, y*) is invertible, then
dy*/dx = -H^{-1} grad^2_yx G, so the hypergradient of F(x, y*(x)) is

    dF/dx = grad_x F - (grad^2_xy G)^T v,    H v = grad_y F.

Algorithm (Pedregosa 2016, "Hyperparameter optimization with approximate gradient";
Rajeswaran et al. 2019, iMAML; Lorraine et al. 2020): solve the lower level with the inner
optimizer (warm-started), solve H v = grad_y F by CG / Neumann / direct on Hessian-vector
products (never forming H except in the direct solve of small problems), then one mixed VJP.
The result is exact when the inner problem and the linear solve converge; it is biased when the
inner solve stops early (report the inner residual). For more than two levels the same theorem
applies level by level (``bilevel.engines.nested_implicit``).

Execution (one CUDA graph, a compiled inner loop, TF32/bf16 for the inner solve and the HVPs)
is the fast path's business (``bilevel.fastpath``); this module is the algorithm."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field
from torch import Tensor

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.implicit_fixed_point import fixed_point_hypergrad, fixed_point_reasons
from bilevel.engines.inner import inner_solve, lower_start, predicted_start
from bilevel.engines.inner_stats import inner_extra, reuse_hypergradient, stops_on_residual
from bilevel.engines.nested_implicit import nested_hypergrad, solve_below
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import Linearization, joint_grad
from bilevel.linalg.solve import make_linear_solver
from bilevel.linalg.tree import tree_norm, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig, LinearSolverSpec
from bilevel.spec.fastpath import FastPathMode, PrecisionSpec

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["CLOSED_FORM_DIRECT_SIZE", "ImplicitConfig", "ImplicitEngine", "ImplicitState"]

CLOSED_FORM_DIRECT_SIZE = 1024
"""Largest closed-form lower level whose Hessian the planner assembles and solves densely."""


class ImplicitConfig(EngineConfig):
    """Implicit differentiation (IFT): dF/dx = grad_x F - (grad^2_xy G)^T H^{-1} grad_y F."""

    kind: Literal["implicit"] = "implicit"
    """Discriminator: the implicit engine."""
    linear_solver: LinearSolverSpec = Field(default_factory=LinearSolverSpec)
    """How H v = grad_y F is solved."""
    hvp: Literal["reverse", "forward"] = "reverse"
    """reverse: double backward through a graph of grad_y G linearized once per hypergradient;
    forward: forward-over-reverse (torch.func.jvp of torch.func.grad)."""
    fast_path: FastPathMode = "auto"
    """How the hypergradient is executed (the result is the same): auto picks per device (CUDA:
    one CUDA graph of the whole hypergradient; CPU: eager); off: eager; cuda_graph: capture the
    whole hypergradient in a CUDA graph and replay it; compile: the first-order inner loop through
    torch.compile (also captured on CUDA). Falls back to eager, saying why once, where it cannot
    apply (see docs/fastpath.md)."""
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    """Reduced precision (TF32, bf16) for the inner solve and Hessian-vector products, checked
    against full precision."""
    reuse_hypergradient_below: Annotated[float, Field(gt=0)] | None = None
    """Recompute the hypergradient only when the inner residual has moved: when the residual of the
    warm start at the new upper variables, ||grad_y G(x_t, y_{t-1})||, is at most this value (the
    previous lower solution still solves the lower level to that tolerance), the inner solve, the
    linear solve and the mixed product are skipped and the previous hypergradient is returned
    again (stats: hypergradient_reused = 1). One host read per call. None: always recompute."""


@dataclass
class ImplicitState(EngineState):
    """The lower solution and the previous linear-system solution v (CG's warm start)."""

    v: Params | None = None
    grad: Params | None = None
    """The last hypergradient computed (kept only with ``reuse_hypergradient_below``)."""
    previous: Params | None = None
    """The lower solution before ``lower`` (kept only with ``solver.extrapolate``: the secant
    predictor's second point)."""


@register
class ImplicitEngine(EngineBase):
    """IFT hypergradients with a linear solver passed in as a value."""

    kind: ClassVar[str] = "implicit"
    Config: ClassVar[type[ImplicitConfig]] = ImplicitConfig
    State: ClassVar[type[ImplicitState]] = ImplicitState
    priority: ClassVar[int] = 80
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="implicit function theorem: H v = grad_y F solved by CG/Neumann/direct on HVPs",
        needs_hvp=True,
        lower_convexity=("strongly_convex",),
        memory="constant",
        exact_when_converged=True,
        handles_instances=True,
        handles_prox_operators=True,
        differentiates_start=True,
        max_depth=None,
        solution_only=True,
        graph_safe=True,
    )

    def compute(self, problem: Problem, x: Params, state: ImplicitState, batch: Any) -> Hypergrad:
        if problem.depth > 2:
            _refuse_nested(self.config)
            return nested_hypergrad(problem, self.config.linear_solver, x, state, batch)
        lower = problem.lower
        solver_spec = lower.solver
        optimizer = InnerOptimizer(solver_spec)
        execution = self.execution
        extrapolate = solver_spec.extrapolate and stops_on_residual(solver_spec)
        y0 = predicted_start(problem, state, x, state.previous) if extrapolate else lower_start(problem, state, x)
        reused = reuse_hypergradient(problem, self.config.reuse_hypergradient_below, x, y0, state, batch)
        if reused is not None:
            if extrapolate:  # the start it kept is the new last point of the path
                reused = dataclasses.replace(reused, state=dataclasses.replace(reused.state, previous=_solved(state)))
            return reused
        steps: Tensor | int = solver_spec.steps
        lin = None
        with execution.reduced_precision(problem):
            if stops_on_residual(solver_spec):  # L-BFGS, Newton-CG, or a tolerance: steps counted on the device
                solved = inner_solve(problem, optimizer, x, y0, optimizer.init(y0), solver_spec.steps)
                y, steps = solved.solution, solved.steps
                if self.config.hvp == "reverse":  # Newton-CG's at its solution, on the same full lower batch
                    lin = solved.linearization
            else:
                y, _ = execution.solve_lower(problem, optimizer, x, y0, optimizer.init(y0), solver_spec.steps)

        lower_batch = lower.batch()
        if lin is None:
            with execution.reduced_precision(problem):
                lin = Linearization(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y, self.config.hvp)
        grad_x, grad_y, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        if lower.nonsmooth:  # sets or proximal terms: differentiate the fixed point y = P(y - eta grad_y G)
            with execution.reduced_precision(problem):
                grad, result, residual = fixed_point_hypergrad(problem, self.config.linear_solver, lin, grad_x, grad_y, state.v)
        else:
            solve = make_linear_solver(self.config.linear_solver, solver_spec.lr, problem.instances)
            with execution.reduced_precision(problem):
                result = solve(lin, grad_y, state.v)
                grad = tree_sub(grad_x, lin.vjp_x(result.solution))
            residual = tree_norm(lin.grad_y).detach()

        stats = Stats(
            inner_residual=residual,
            # with a batch of instances, the worst instance's residual
            linear_residual=result.residual.detach().amax(),
            hvp_count=result.matvecs,
            inner_steps=steps,
            extra=inner_extra(solver_spec, residual, self.config.reuse_hypergradient_below, reused=False),
        )
        keep = self.config.reuse_hypergradient_below is not None
        new_state = ImplicitState(tuple(p.detach() for p in y), state.inner_state, state.step + 1,
                                  v=tuple(v.detach() for v in result.solution),
                                  grad=tuple(g.detach() for g in grad) if keep else None,
                                  previous=_solved(state) if extrapolate else None)
        return Hypergrad(grad, upper_loss, new_state, stats)

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        if problem.depth > 2:
            return solve_below(problem, self.config.linear_solver, x, state)
        return super().lower_solution(problem, x, state)

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation == "closed_form":
            return _closed_form(facts)
        if situation != "strongly_convex":
            return None
        if facts.depth > 2:
            return _nested(facts)
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
        return Proposal(ImplicitConfig(linear_solver=solver), [*reasons, *fixed_point_reasons(facts)])

    @classmethod
    def explain(cls, config: ImplicitConfig, facts: ProblemFacts) -> Proposal:
        return Proposal(config, fixed_point_reasons(facts))

    @classmethod
    def refusals(cls, config: ImplicitConfig, facts: ProblemFacts) -> list[tuple[str, str]]:
        out = list(_nested_refusals(config).items()) if facts.depth > 2 else []
        if facts.init_from and not facts.prox:
            out += [(path, "the implicit engine differentiates the lower solution, which does not depend on where its solve"
                           " starts: through init_from alone the meta-gradient is identically zero. Declare prox (iMAML:"
                           f" levels.{facts.lower_level}.prox) or use the unrolled engine (MAML)") for path in facts.init_from]
        if facts.depth > 2 and facts.lower_sets:
            out.append((facts.lower_sets[0], "the nested implicit engine differentiates the unconstrained stationarity"
                        " condition grad G = 0 of each level, which does not hold where a variable sits on the boundary of"
                        " its set; the fixed point of projected steps is differentiated for two levels only. Use the"
                        " unrolled engine (it differentiates through the projections)"))
        if facts.instances and config.linear_solver.method == "direct":
            out.append(("engine.linear_solver.method", "the direct solve does not support a batch of instances; use cg"))
        return out


def _nested_refusals(config: ImplicitConfig) -> dict[str, str]:
    """Options a chain of more than two levels cannot use: dotted spec path -> why."""
    out = {}
    if config.hvp != "reverse":
        out["engine.hvp"] = "forward-mode products cannot differentiate through the implicit derivatives of lower levels; use reverse"
    if config.linear_solver.method == "direct":
        out["engine.linear_solver.method"] = ("the direct solve assembles H with batched products, which do not pass through"
                                              " the implicit derivatives of lower levels; use cg or neumann")
    return out


def _solved(state: ImplicitState) -> Params | None:
    """state.lower when it is a lower solution (after a first call), as the secant predictor's
    second point; None before (the initial values are not on the path of solutions)."""
    return state.lower if state.step > 0 else None


def _refuse_nested(config: ImplicitConfig) -> None:
    problems = _nested_refusals(config)
    if problems:
        raise ValueError("; ".join(f"{field}: {why}" for field, why in problems.items()))


def _closed_form(facts: ProblemFacts) -> Proposal:
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
    return Proposal(ImplicitConfig(linear_solver=solver), reasons)


def _nested(facts: ProblemFacts) -> Proposal:
    lower = ", ".join(f"levels.{name}" for name in facts.levels[1:])
    default = LinearSolverSpec()
    largest = max(facts.sizes[1:])
    maxiter = min(default.maxiter, largest)
    exact = " (at least the size of the largest lower level, so CG is exact in exact arithmetic)" if maxiter == largest else ""
    reasons = [
        f"{lower} all declare convexity = strongly_convex: implicit differentiation applies level by level (nested"
        " implicit engine); each middle level's Hessian-vector products differentiate through the implicit derivatives"
        " of the levels below it (third-order products, no Hessian formed), with memory independent of the inner steps",
        f"each linear system is solved by CG with {maxiter} iterations{exact}; one hypergradient costs"
        f" {facts.nested_steps()} inner optimizer steps and, for the top level's gradient, about {maxiter}^{len(facts.levels) - 1}"
        " products",
    ]
    return Proposal(ImplicitConfig(linear_solver=LinearSolverSpec(method="cg", maxiter=maxiter)), reasons)
