"""DARTS (Liu, Simonyan & Yang 2019, "DARTS: Differentiable Architecture Search", ICLR): one
warm-started weight step, then one architecture step, per outer step.

With L_train = G (lower objective, weight decay included) and L_val = F, outer step k does

    w <- w - lr (mu m + grad_w L_train(w, alpha))              (the lower solver; ``steps`` times)
    order 1:  g = grad_alpha L_val(w, alpha)
    order 2:  w' = w - xi (mu m + grad_w L_train(w, alpha))     (virtual step, momentum and weight
                                                                 decay included, as the DARTS code)
              v  = grad_w' L_val(w', alpha)
              g  = grad_alpha L_val(w', alpha) - xi grad^2_{alpha,w} L_train(w, alpha) v

and the outer optimizer moves alpha along g. g of order 2 is the exact gradient of
L_val(w'(alpha), alpha) for an sgd or momentum weight solver (for adam the virtual step is the
plain step w - xi grad_w L_train, as in the paper). The mixed product is a central difference

    grad^2_{alpha,w} L_train v ~ [grad_alpha L_train(w + eps v) - grad_alpha L_train(w - eps v)] / (2 eps),
    eps = 0.01 / ||v||

(DARTS) or exact (``hessian: exact``: one mixed VJP of the shared Linearization).

Collapse guard (DARTS-ES, Zela et al. 2020, "Understanding and Robustifying Differentiable
Architecture Search", ICLR): every ``eigen_every`` steps the dominant eigenvalue of
grad^2_alpha L_val(w, alpha) is estimated by power iteration on Hessian-vector products and logged
(``eigenvalue``); with ``early_stop_ratio`` the run stops once
mean(window k estimates ago) / mean(current window) < ratio, ending with the architecture of k
estimates ago. The skip-connection limit of the derived cell is the search space's ``max_skip``.

Weight schedule (sharpDARTS, Hundt et al. 2019, cosine power annealing; or any schedule of the
lower solver): weight step t of the whole search (warm-up included) runs at the scheduled rate
lr_t over ``schedule_steps``, logged as ``weight_lr``; the default xi follows it (as the DARTS code).

Analytic check (tests): L_train = (w - alpha)^2, L_val = alpha w - 2 alpha + 1 has the bilevel
optimum (1, 1); first order converges to (2, 2), second order to alpha = 2 / (1 + 2 xi)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.architecture import architecture_memory_mb, architecture_reason, grad_x, is_scheduled, lower_steps, memory_estimate
from bilevel.engines.architecture import solver_at, weight_steps
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.eigen import power_iteration
from bilevel.linalg.hvp import Linearization, joint_grad
from bilevel.linalg.tree import tree_axpy, tree_norm, tree_scale, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig
from bilevel.spec.level import OptimizerSpec

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["DartsConfig", "DartsEngine", "DartsState", "virtual_step"]


class DartsConfig(EngineConfig):
    """DARTS (Liu et al. 2019): per outer step, ``steps`` warm-started steps of the lower solver on
    the weights w, then the architecture direction

        order 1:  grad_alpha L_val(w, alpha)
        order 2:  grad_alpha L_val(w', alpha) - xi grad^2_{alpha,w} L_train(w, alpha) grad_w' L_val(w', alpha),

    w' = one virtual step of the lower solver from w (momentum and weight decay included). The
    mixed product is a central finite difference (as the paper) or exact (one mixed VJP)."""

    kind: Literal["darts"] = "darts"
    """Discriminator: the DARTS engine."""
    order: Literal[1, 2] = 2
    """1: first-order DARTS (w' = w); 2: second order, with the virtual step."""
    hessian: Literal["finite_difference", "exact"] = "finite_difference"
    """Order 2: the mixed product by central differences of grad_alpha L_train at w +- eps v,
    eps = fd_radius / ||v|| (DARTS), or exactly by one mixed vector-Jacobian product."""
    fd_radius: Annotated[float, Field(gt=0)] = 0.01
    """r in eps = r / ||grad_w' L_val|| (DARTS: 0.01)."""
    xi: Annotated[float, Field(gt=0)] | None = None
    """Virtual step size; None: the lower solver's learning rate (as the DARTS code)."""
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    """Weight steps before the first architecture step (in the first outer step), so that the
    parametric operations are trained before the architecture judges them (PC-DARTS warms up for
    15 of 50 epochs). None: the architecture variable's warmup_steps (0 without one)."""
    eigen_every: Annotated[int, Field(ge=1)] | None = None
    """Estimate the dominant eigenvalue of grad^2_alpha L_val (power iteration on Hessian-vector
    products) every N outer steps, logged as ``eigenvalue``; None: never."""
    eigen_iters: Annotated[int, Field(ge=1)] = 20
    """Power-iteration steps per estimate (warm-started from the previous eigenvector)."""
    early_stop_ratio: Annotated[float, Field(gt=0, lt=1)] | None = None
    """DARTS-ES (Zela et al. 2020): stop when mean(eigenvalues of the window ``lookback`` estimates
    ago) / mean(eigenvalues of the current window) falls below this ratio (paper: 0.75), and end
    with the architecture of ``lookback`` estimates ago. None: no early stop. Needs eigen_every."""
    eigen_window: Annotated[int, Field(ge=1)] = 5
    """Estimates averaged on each side of the early-stopping comparison."""
    eigen_lookback: Annotated[int, Field(ge=1)] = 5
    """k: the comparison is with the window k estimates earlier, whose architecture is restored."""

    @model_validator(mode="after")
    def _early_stop_needs_estimates(self) -> "DartsConfig":
        if self.early_stop_ratio is not None and self.eigen_every is None:
            raise ValueError("early_stop_ratio needs eigen_every (how often the eigenvalue is estimated)")
        return self


@dataclass
class DartsState(EngineState):
    """The weights and, with the curvature guard, the power iteration's last eigenvector, the
    eigenvalue history and the architectures at the last estimates (for DARTS-ES's restore)."""

    eigvec: Params | None = None
    eigenvalues: Params | None = None
    eigen_snapshots: Params | None = None


def virtual_step(problem: Problem, x: Params, w: Params, state: Params, batch: Any, xi: float) -> tuple[Params, Params]:
    """(w', grad_w G(x, w)): one step of size xi of the lower solver from w with its current
    state (momentum buffer), or a plain gradient step for adam."""
    spec = problem.lower.solver
    hyper = problem.tuned_hyperparameters(x, {k: v for k, v in spec.tuned.items() if k == "momentum"})
    x = tuple(p.detach() for p in x)
    grads, _ = grad_x(lambda ww: problem.lower_objective(x, ww, batch), w)
    if spec.name in ("sgd", "momentum"):
        virtual = InnerOptimizer(spec.model_copy(update={"lr": xi}))
        moved, _ = virtual.step(w, grads, state, hyper)
    else:
        moved, _ = InnerOptimizer(OptimizerSpec(name="sgd", lr=xi)).step(w, grads, ())
    return tuple(p.detach() for p in moved), grads


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> Params:
    out, start = [], 0
    for p in like:
        out.append(flat[start : start + p.numel()].reshape(p.shape).clone())
        start += p.numel()
    return tuple(out)


@register
class DartsEngine(EngineBase):
    """First- or second-order DARTS with an optional Hessian-eigenvalue early stop."""

    kind: ClassVar[str] = "darts"
    Config: ClassVar[type[DartsConfig]] = DartsConfig
    State: ClassVar[type[DartsState]] = DartsState
    priority: ClassVar[int] = 30
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="DARTS: one weight step, one architecture step; first order, or second order through a virtual weight step",
        needs_hvp=True,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="constant",
        handles_architecture=True,
        returns_hypergradient=False,
    )

    def xi(self, problem: Problem, x: Params, weight_step: int = 0) -> float:
        """The virtual step size: the config's xi, else the lower solver's learning rate at weight
        step ``weight_step`` (its current value: tuned, or scheduled)."""
        if self.config.xi is not None:
            return self.config.xi
        spec = problem.lower.solver
        if "lr" in spec.tuned:
            return float(problem.tuned_hyperparameters(x, {"lr": spec.tuned["lr"]})["lr"])
        return solver_at(spec, weight_step).lr

    def compute(self, problem: Problem, x: Params, state: DartsState, batch: Any) -> Hypergrad:
        config = self.config
        lower = problem.lower
        optimizer = InnerOptimizer(lower.solver)
        steps, first = weight_steps(config.warmup_steps, problem, state.step)
        w, opt_state, step_grads, train_batch = lower_steps(problem, optimizer, x, state.lower, state.inner_state, steps, first)
        last_step = first + max(steps - 1, 0)
        if train_batch is None:
            train_batch = lower.batch()
        hvps = 0
        if config.order == 1:
            grad, upper_loss = grad_x(lambda xx: problem.upper_objective(xx, w, batch), x)
            residual_grads = step_grads
        else:
            xi = self.xi(problem, x, last_step)
            moved, residual_grads = virtual_step(problem, x, w, opt_state, train_batch, xi)
            f_x, f_w, upper_loss = joint_grad(lambda xx, ww: problem.upper_objective(xx, ww, batch), x, moved)
            mixed = self._mixed_product(problem, x, w, f_w, train_batch)
            grad = tree_axpy(-xi, mixed, f_x)
            hvps = 1

        new_state = DartsState(w, opt_state, state.step + 1, state.eigvec, state.eigenvalues, state.eigen_snapshots)
        stats_extra: dict[str, Tensor | float] = {}
        if is_scheduled(lower.solver):
            stats_extra["weight_lr"] = solver_at(lower.solver, last_step).lr
        stop, restore = None, None
        if config.eigen_every is not None and (state.step + 1) % config.eigen_every == 0:
            stop, restore = self._curvature(problem, x, w, batch, new_state, stats_extra)
            hvps += config.eigen_iters

        if residual_grads is None:
            residual_grads, _ = grad_x(lambda ww: problem.lower_objective(tuple(p.detach() for p in x), ww, train_batch), w)
        stats = Stats(
            inner_residual=tree_norm(residual_grads).detach(),
            linear_residual=None,
            hvp_count=hvps,
            inner_steps=steps,
            extra=stats_extra,
        )
        return Hypergrad(grad, upper_loss, new_state, stats, stop, restore)

    def _mixed_product(self, problem: Problem, x: Params, w: Params, v: Params, batch: Any) -> Params:
        """grad^2_{alpha,w} L_train(w, alpha) v: exact (mixed VJP) or by central differences."""
        objective = problem.lower_objective
        if self.config.hessian == "exact":
            lin = Linearization(lambda xx, ww: objective(xx, ww, batch), x, w)
            return tuple(g.detach() for g in lin.vjp_x(v))
        eps = self.config.fd_radius / tree_norm(v).clamp_min(1e-30)
        plus, minus = tree_axpy(eps, v, w), tree_axpy(-eps, v, w)
        g_plus, _ = grad_x(lambda xx: objective(xx, plus, batch), x)
        g_minus, _ = grad_x(lambda xx: objective(xx, minus, batch), x)
        return tree_scale(0.5 / eps, tree_sub(g_plus, g_minus))

    def _curvature(
        self, problem: Problem, x: Params, w: Params, batch: Any, state: DartsState, stats: dict[str, Tensor | float]
    ) -> tuple[str | None, Params | None]:
        """Estimate the dominant eigenvalue of grad^2_alpha L_val(w, alpha) (recorded in
        ``state``); apply the DARTS-ES rule."""
        config = self.config
        lin = Linearization(lambda ww, aa: problem.upper_objective(aa, ww, batch), w, x)  # Hessian in alpha
        start = state.eigvec if state.eigvec is not None else tuple(torch.randn_like(p) for p in x)
        eigenvalue, vector = power_iteration(lin.hvp, start, config.eigen_iters)
        eigenvalue = eigenvalue.detach()
        state.eigvec = tuple(v.detach() for v in vector)
        history = eigenvalue.reshape(1) if state.eigenvalues is None else torch.cat([state.eigenvalues[0], eigenvalue.reshape(1)])
        snapshots = torch.cat([p.detach().reshape(-1) for p in x]).unsqueeze(0)
        if state.eigen_snapshots is not None:
            snapshots = torch.cat([state.eigen_snapshots[0], snapshots])[-(config.eigen_lookback + 1) :]
        state.eigenvalues, state.eigen_snapshots = (history,), (snapshots,)
        stats["eigenvalue"] = eigenvalue
        if config.early_stop_ratio is None or history.numel() < config.eigen_window + config.eigen_lookback:
            return None, None
        k, window = config.eigen_lookback, config.eigen_window
        now = history[-window:].mean()
        then = history[-window - k : history.numel() - k].mean()
        now_value, then_value = torch.stack([now, then]).tolist()  # one host sync, at estimate steps only
        ratio = then_value / now_value if now_value > 0 else float("inf")
        stats["eigen_ratio"] = ratio
        if ratio >= config.early_stop_ratio:
            return None, None
        reason = (
            f"the dominant eigenvalue of the validation Hessian in the architecture grew from {then_value:.4g} to"
            f" {now_value:.4g} (mean over {window} estimates; ratio {ratio:.3f} < {config.early_stop_ratio}):"
            f" DARTS-ES early stop, the architecture of {k} estimates ({k * config.eigen_every} steps) ago is restored"
        )
        return reason, _unflat(snapshots[0], x)

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        """Second order with the exact mixed product where it fits the budget, else with the
        paper's finite difference, else first order (sgd/momentum weight solvers; other solvers
        get first order, the virtual step being defined for those two)."""
        if situation != "architecture":
            return None
        memory, budget, estimate = architecture_memory_mb(facts), facts.memory_mb, memory_estimate(facts)
        reasons = [architecture_reason(facts)]
        warnings: list[str] = []
        second_order = ("its virtual weight step w' = w - xi (mu m + grad_w L_train) lets the architecture gradient see how"
                        " the weights respond (first order ignores it and is biased: on the analytic toy it ends at alpha = 2, not 1)")
        stepped = facts.lower_solver in ("sgd", "momentum")
        if stepped and memory["darts_second_order_exact"] <= budget:
            config = DartsConfig(order=2, hessian="exact")
            reasons.append(
                f"second-order DARTS with the exact mixed product fits the {budget:.0f} MiB budget (about"
                f" {memory['darts_second_order_exact']:.0f} MiB; {estimate}): {second_order}; the mixed second derivative is"
                " one exact vector-Jacobian product, because the paper's central difference (radius 0.01) crosses ReLU kinks"
                " and was measured 100% off (cosine 0.66) on the digits supernet (docs/engines/darts.md)"
            )
        elif stepped and memory["darts_second_order"] <= budget:
            config = DartsConfig(order=2)
            reasons.append(
                f"second-order DARTS fits the {budget:.0f} MiB budget (about {memory['darts_second_order']:.0f} MiB; {estimate}),"
                f" but not its exact mixed product (about {memory['darts_second_order_exact']:.0f} MiB): {second_order}; the"
                " mixed second derivative is a central finite difference of two gradients (as the paper), no double backward"
            )
        else:
            config = DartsConfig(order=1)
            reasons.append(
                f"second order does not fit the {budget:.0f} MiB budget (about {memory['darts_second_order']:.0f} MiB"
                f" against {memory['darts_first_order']:.0f} MiB for first order; {estimate}): first-order DARTS, the"
                " cheapest (one gradient for the weights, one for the architecture), biased where the weights' response matters"
            )
            if memory["darts_first_order"] > budget:
                warnings.append(
                    f"even first-order DARTS needs about {memory['darts_first_order']:.0f} MiB, over the {budget:.0f} MiB budget:"
                    " set the search space's partial_channels (PC-DARTS, e.g. 4) or lower the batch size"
                )
        return Proposal(config, reasons, warnings)
