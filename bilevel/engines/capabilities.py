"""What an engine assumes and what it costs: the facts the planner matches against a problem's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Capabilities", "Convexity"]

Convexity = Literal["strongly_convex", "convex", "nonconvex", "unknown"]


@dataclass(frozen=True)
class Capabilities:
    """What an engine assumes and what it costs; the planner reads only this (and the engine's
    own ``configure``), never the engine's name."""

    summary: str
    """One line: what the engine computes."""
    needs_hvp: bool
    """Uses Hessian-vector products of the lower objective."""
    lower_convexity: tuple[Convexity, ...]
    """Lower-level convexity classes under which the engine's hypergradient is justified."""
    memory: Literal["constant", "horizon"]
    """constant: O(size of y) independent of the inner horizon; horizon: grows with the steps it differentiates."""
    exact_when_converged: bool = False
    """Gives the exact hypergradient when the inner problem (and linear solve) converge."""
    first_order: bool = False
    """Needs only first derivatives."""
    handles_constraints: bool = False
    """Accepts lower-level functional constraints."""
    handles_coupled_constraints: bool = False
    """Accepts lower-level constraints that involve the upper variables."""
    handles_discrete: bool = False
    """Accepts discrete or non-differentiable upper variables."""
    handles_architecture: bool = False
    """Accepts architecture-mixture upper variables."""
    unbounded_smoothness: bool = False
    """Designed for upper levels whose smoothness is unbounded (RNNs)."""
    outer_optimizer: str | None = None
    """The upper-level optimizer the algorithm is defined with (None: any)."""
    through_optimizer: bool = False
    """Differentiates through the inner optimizer's steps, so optimizer hyperparameters tuned by
    upper variables (lr, momentum) receive hypergradients."""
    derivative_free: bool = False
    """Estimates the hypergradient from values of F alone (zero-order): it differentiates neither
    the objectives nor the inner solver, so a closed-form or external lower solve is used as it is."""
    returns_hypergradient: bool = True
    """Each call returns an estimate of dF/dx; False for single-loop methods whose per-step
    direction (a penalized gradient, a momentum estimate) is not a hypergradient by itself."""
    needs_best_response: bool = False
    """Needs a lower model that takes the hyperparameters as input (built from STN layers): a
    best-response approximation the engine fits."""
    handles_instances: bool = False
    """Solves a batch of independent instances (spec ``instances``) exactly as it solves each one
    alone: nothing in it couples the instances except through per-instance reductions."""
    max_depth: int | None = 2
    """The deepest chain of levels it solves (2: bilevel problems; None: any depth)."""
    handles_prox_operators: bool = False
    """Differentiates a lower level with proximal terms (``prox`` on a variable) exactly: through
    the proximal steps, or by implicit differentiation of their fixed point. Engines without it
    would ignore the non-smooth term g in their formulas, and are refused on such a level."""
    differentiates_start: bool = False
    """Takes the meta-gradient through a lower solve that starts at upper variables (``init_from``:
    MAML's initialization): through the unrolled steps back to their start, or through a proximal
    term anchoring the lower level (iMAML). Engines without it would drop that path, and are
    refused on such a level."""
    samples_blocks: bool = False
    """Takes a lower level of blocks of which only some are drawn per outer step (``blocks.sample``
    below ``blocks.count``), keeping every block's state between its draws. Engines without it
    solve a level of blocks only with every block drawn (as a batch of instances)."""
    solution_only: bool = False
    """Uses the lower solution alone, never the inner optimizer's steps (and runs the level's own
    solver for it): the inner solver may then be any minimizer (lbfgs, newton_cg) and may stop on
    its residual (solver.tol). Engines without it are refused both."""
    needs_quadratic: bool = False
    """Solves only a lower level whose objective is declared quadratic (``assumptions.quadratic``;
    the batched QP engine): listed for others nowhere a compatible engine is chosen by capability."""
    graph_safe: bool = False
    """Its call depends on its inputs only through tensors (the state's step counter is only
    counted, never read), so the fast path may capture one CUDA graph for every call of the same
    shapes. An engine whose schedule reads the step keeps this False."""

    def solves_depth(self, depth: int) -> bool:
        return self.max_depth is None or depth <= self.max_depth
