"""Batched QP lower levels: solved by an interior-point method, differentiated through their KKT
conditions or their value function.

The lower level is a convex QP in y (declared ``assumptions: {quadratic: true}`` with constraints
declared ``affine: true``), for one problem or for each of N instances at once:

    y*(x) = argmin_y G(x, y)   s.t.  c(x, y) <= 0,  e(x, y) = 0,

read off the user's functions at every step (``bilevel.engines.qp_model``) and solved for the
whole batch by ``bilevel.linalg.qp.solve_qp`` (Mehrotra's predictor-corrector), which returns the
multipliers z* >= 0 and nu* with the solution.

**Through the KKT conditions** (``gradient: kkt``; Amos & Kolter 2017, OptNet). With
w = (y, z, nu), the solution is a zero of

    R(x, w) = [grad_y G(x, y) + grad_y (z^T c(x, y) + nu^T e(x, y));  z o c(x, y);  e(x, y)],

and the implicit function theorem gives dw*/dx = -R_w^{-1} R_x, so

    dF/dx = grad_x F - lam^T R_x,      R_w^T lam = (grad_y F, 0, 0),

R_w = [[Q, G_c^T, A^T], [diag(z) G_c, diag(c), 0], [A, 0, 0]] being the (small, per instance) KKT
matrix. lam^T R_x is d/dx <R(x, w*), lam> at fixed w* and lam: one backward through grad_y G and
the constraints (mixed second derivatives by autograd, no Jacobian in x is formed). This is
exact wherever the solution is strictly complementary (no constraint active with a zero
multiplier) and the active rows are linearly independent.

**Through the value function** (``gradient: value``; Danskin's theorem; BODex, Chen et al. 2024).
When the upper objective is the lower problem's value plus terms in x alone, F(x, y) = G(x, y) +
R(x), the hypergradient needs no linear solve:

    dF/dx = grad_x [F(x, y*) + z*^T c(x, y*) + nu*^T e(x, y*)]       (at fixed y*, z*, nu*).

The engine checks at its first step that grad_y F = grad_y G (else the value route would drop
the path through y*, and it is refused).

Cost per step: n Hessian-vector products in one batched backward and one batched backward per
constraint function to read the QP (n: variables per instance), a dense (n + p)-square
factorization per instance and interior-point iteration, and one (n + m + p)-square solve per
instance for the KKT adjoint. For tens of variables per instance; above ``max_variables`` the
planner does not choose it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from bilevel.distributed.reduce import current_world
from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.qp_model import InstanceLayout, LowerQP, read_qp
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.hvp import joint_grad
from bilevel.linalg.qp import QPSolution, solve_qp
from bilevel.linalg.tree import zeros_for_none
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig
from bilevel.spec.errors import SpecError

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["QPConfig", "QPEngine", "QPState"]


class QPConfig(EngineConfig):
    """A convex QP lower level (quadratic objective, affine constraints), solved for every instance
    at once by an interior-point method and differentiated through its KKT conditions or its value."""

    kind: Literal["qp"] = "qp"
    """Discriminator: the batched QP engine."""
    gradient: Literal["kkt", "value"] = "kkt"
    """kkt: implicit differentiation of the KKT conditions (any upper objective); value: Danskin's
    theorem, for an upper objective that is the lower value plus terms in x alone (no linear solve)."""
    iterations: Annotated[int, Field(ge=1)] = 30
    """Interior-point iterations (each instance stops moving once its KKT residual is below ``tol``)."""
    tol: Annotated[float, Field(gt=0)] | None = None
    """KKT residual at which an instance is converged; None: eps^(3/4) of the run's dtype."""
    max_variables: Annotated[int, Field(ge=1)] = 64
    """Largest number of lower variables per instance the planner gives this engine (its matrices are dense)."""


@dataclass
class QPState(EngineState):
    """The lower solution y* (in ``lower``) with its multipliers, per instance (N, m) and (N, p)
    (the QP is solved afresh at every step: they are what a checkpoint shows, not a warm start)."""

    z: Params | None = None
    nu: Params | None = None


@register
class QPEngine(EngineBase):
    """Interior-point solve of a batch of lower QPs; KKT or value-function hypergradient."""

    kind: ClassVar[str] = "qp"
    Config: ClassVar[type[QPConfig]] = QPConfig
    State: ClassVar[type[QPState]] = QPState
    priority: ClassVar[int] = 55
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="batched convex QP lower levels: interior-point solve, KKT or value-function hypergradient",
        needs_hvp=True,
        lower_convexity=("strongly_convex", "convex"),
        memory="constant",
        exact_when_converged=True,
        handles_constraints=True,
        handles_coupled_constraints=True,
        handles_instances=True,
        needs_quadratic=True,
    )

    def _solve(self, problem: Problem, x: Params, state: QPState, batch: Any) -> tuple[LowerQP, QPSolution, InstanceLayout]:
        if current_world().size > 1:
            raise SpecError([problem.source.issue("engine.kind", "the qp engine does not run data-parallel (torchrun): its"
                                                  " constraint rows are not summed over ranks; run it in one process")])
        layout = InstanceLayout.of(problem)
        qp = read_qp(problem, x, state.lower, batch, layout, check=state.step == 0)
        solution = solve_qp(qp.Q, qp.q, qp.G, qp.h, qp.A, qp.b, self.config.iterations, self.config.tol)
        return qp, solution, layout

    def compute(self, problem: Problem, x: Params, state: QPState, batch: Any) -> Hypergrad:
        lower_batch = problem.lower.batch()  # one draw: the QP and its derivatives on the same batch
        qp, sol, layout = self._solve(problem, x, state, lower_batch)
        y = layout.unflat(sol.y, problem.lower.stacked)
        grad_x, grad_y, upper_loss = joint_grad(lambda xx, yy: problem.upper_objective(xx, yy, batch), x, y)
        if state.step == 0 and self.config.gradient == "value":
            _check_value_route(problem, x, y, grad_y, lower_batch)
        if self.config.gradient == "value":
            correction, linear_residual = _multiplier_term(problem, x, y, sol, qp, layout, lower_batch), None
            grad = tuple(g + c for g, c in zip(grad_x, correction))
        else:
            lam, linear_residual = _kkt_adjoint(qp, sol, layout.flat(grad_y))
            grad = tuple(g - r for g, r in zip(grad_x, _residual_vjp(problem, x, y, sol, qp, layout, lam, lower_batch)))
        stats = Stats(
            inner_residual=sol.residual.amax(),
            linear_residual=linear_residual,
            hvp_count=layout.size,
            inner_steps=sol.iterations,
            extra={"qp_complementarity": (sol.s * sol.z).sum(-1).amax() if sol.s.numel() else sol.residual.new_zeros(())},
        )
        new_state = QPState(tuple(p.detach() for p in y), state.inner_state, state.step + 1,
                            z=(sol.z.detach(),), nu=(sol.nu.detach(),))
        return Hypergrad(grad, upper_loss, new_state, stats)

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        """The QP's solution at the final x (the interior-point solve, not the first-order inner solver)."""
        qp_state = state if isinstance(state, QPState) else QPState(state.lower, state.inner_state, state.step)
        _, solution, layout = self._solve(problem, x, qp_state, problem.lower.batch())
        return layout.unflat(solution.y, problem.lower.stacked)

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation != "constraints" or not _is_qp(facts) or facts.lower_convexity != "strongly_convex":
            return None
        config = QPConfig()
        per_instance = facts.n_lower // (facts.instances or 1)
        if per_instance > config.max_variables:
            return None
        lower = f"levels.{facts.lower_level}"
        batch = f" for each of the {facts.instances} instances at once" if facts.instances else ""
        reasons = [
            f"{lower}.assumptions declares a strongly convex quadratic objective and every one of its {facts.constraints}"
            f" constraint(s) is declared affine: the lower level is a convex QP, solved by an interior-point method"
            f"{batch} (dense, {per_instance} variables per instance <= engine.max_variables = {config.max_variables})",
            "its hypergradient is the implicit derivative of the QP's KKT conditions (exact at the solution, one small"
            " linear solve per instance); set engine.gradient = value when the upper objective is the lower value",
        ]
        return Proposal(config, reasons)

    @classmethod
    def explain(cls, config: QPConfig, facts: ProblemFacts) -> Proposal:
        lower = f"levels.{facts.lower_level}"
        warnings = []
        if not facts.lower_quadratic:
            warnings.append(f"{lower}.assumptions.quadratic is not declared: the qp engine checks at its first step that"
                            " the lower objective is quadratic in its variables")
        if facts.constraints != facts.affine_constraints:
            warnings.append(f"{lower}.constraints: not every constraint is declared affine; the qp engine checks at its"
                            " first step that they are")
        return Proposal(config, [], warnings)

    @classmethod
    def refusals(cls, config: QPConfig, facts: ProblemFacts) -> list[tuple[str, str]]:
        out = []
        if facts.depth > 2:
            out.append(("levels", "the qp engine solves two levels"))
        if facts.lower_sets or facts.prox_operators:
            path = (facts.lower_sets or facts.prox_operators)[0]
            out.append((path, "the qp engine takes constraints as functions (constraints:), not sets or proximal terms"))
        return out


def _is_qp(facts: ProblemFacts) -> bool:
    return (facts.lower_quadratic and facts.constraints == facts.affine_constraints and facts.depth == 2
            and not facts.lower_sets and not facts.prox_operators)


def _kkt_matrix(qp: LowerQP, sol: QPSolution, flat_y: Tensor) -> Tensor:
    """R_w per instance, (N, n + m + p) square (see the module docstring)."""
    N, n = flat_y.shape
    m, p = qp.G.shape[1], qp.A.shape[1]
    c = (qp.G @ flat_y.unsqueeze(-1)).squeeze(-1) - qp.h
    zeros = flat_y.new_zeros
    top = torch.cat([qp.Q, qp.G.transpose(1, 2), qp.A.transpose(1, 2)], 2)
    middle = torch.cat([sol.z.unsqueeze(-1) * qp.G, torch.diag_embed(c), zeros(N, m, p)], 2)
    bottom = torch.cat([qp.A, zeros(N, p, m), zeros(N, p, p)], 2)
    return torch.cat([top, middle, bottom], 1)


def _kkt_adjoint(qp: LowerQP, sol: QPSolution, grad_y: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """lam = R_w^{-T} (grad_y F, 0, 0), split into its (y, z, nu) parts, and the solve's worst
    relative residual over the instances."""
    matrix = _kkt_matrix(qp, sol, sol.y).transpose(1, 2)
    N, n = grad_y.shape
    m, p = qp.G.shape[1], qp.A.shape[1]
    rhs = torch.cat([grad_y, grad_y.new_zeros(N, m + p)], 1)
    lam = torch.linalg.solve(matrix, rhs.unsqueeze(-1)).squeeze(-1)
    residual = ((matrix @ lam.unsqueeze(-1)).squeeze(-1) - rhs).norm(dim=1) / rhs.norm(dim=1).clamp(min=torch.finfo(rhs.dtype).tiny)
    return (lam[:, :n], lam[:, n:n + m], lam[:, n + m:]), residual.amax().detach()


def _split(problem: Problem, values: tuple[Tensor, ...], qp: LowerQP, layout: InstanceLayout) -> tuple[Tensor, Tensor]:
    """The constraint values as (N, m) inequalities and (N, p) equalities, in G's and A's row order."""
    def rows(which: tuple[int, ...], like: Tensor) -> Tensor:
        chosen = [values[i].reshape(layout.count, -1) for i in which]
        return torch.cat(chosen, 1) if chosen else like
    return rows(qp.inequality, qp.h.new_zeros(layout.count, 0)), rows(qp.equality, qp.b.new_zeros(layout.count, 0))


def _residual_vjp(problem: Problem, x: Params, y: Params, sol: QPSolution, qp: LowerQP, layout: InstanceLayout,
                  lam: tuple[Tensor, Tensor, Tensor], batch: Any) -> Params:
    """lam^T R_x = d/dx <R(x, w*), lam> at fixed w* and lam."""
    lam_y, lam_z, lam_nu = (t.detach() for t in lam)
    z, nu = sol.z.detach(), sol.nu.detach()
    xs = tuple(p.detach().requires_grad_(True) for p in x)
    ys = tuple(p.detach().requires_grad_(True) for p in y)
    with torch.enable_grad():
        c, e = _split(problem, problem.constraint_values(xs, ys, batch), qp, layout)
        lagrangian = problem.lower_objective(xs, ys, batch) + (z * c).sum() + (nu * e).sum()
        grad_y = layout.flat(zeros_for_none(torch.autograd.grad(lagrangian, ys, create_graph=True, allow_unused=True), ys))
        pairing = (grad_y * lam_y).sum() + (z * c * lam_z).sum() + (e * lam_nu).sum()
        return zeros_for_none(torch.autograd.grad(pairing, xs, allow_unused=True), xs)


def _multiplier_term(problem: Problem, x: Params, y: Params, sol: QPSolution, qp: LowerQP, layout: InstanceLayout,
                     batch: Any) -> Params:
    """grad_x (z*^T c(x, y*) + nu*^T e(x, y*)): zero unless a constraint involves x."""
    if not problem.lower.constraints:
        return tuple(torch.zeros_like(p) for p in x)
    xs = tuple(p.detach().requires_grad_(True) for p in x)
    with torch.enable_grad():
        c, e = _split(problem, problem.constraint_values(xs, tuple(p.detach() for p in y), batch), qp, layout)
        term = (sol.z.detach() * c).sum() + (sol.nu.detach() * e).sum()
        if not term.requires_grad:
            return tuple(torch.zeros_like(p) for p in x)
        return zeros_for_none(torch.autograd.grad(term, xs, allow_unused=True), xs)


def _check_value_route(problem: Problem, x: Params, y: Params, f_y: Params, lower_batch: Any) -> None:
    """``gradient: value`` is Danskin's theorem for F = G + R(x): grad_y F (given) must equal grad_y G."""
    _, g_y, _ = joint_grad(lambda xx, yy: problem.lower_objective(xx, yy, lower_batch), x, y)
    gap = max(float((a - b).abs().max()) for a, b in zip(f_y, g_y))
    scale = 1 + max(float(b.abs().max()) for b in g_y)
    if gap > float(torch.finfo(g_y[0].dtype).eps) ** 0.5 * scale:
        raise SpecError([problem.source.issue("engine.gradient", "gradient: value needs an upper objective equal to the"
                                              " lower objective plus terms in the upper variables alone (Danskin's"
                                              f" theorem), but grad_y F differs from grad_y G by {gap:.3g}; use gradient: kkt")])
