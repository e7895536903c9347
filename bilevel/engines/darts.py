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
lower solver): weight step t of the whole search (warm-up included) runs at the solver's
scheduled rate lr_t over ``schedule_steps``, and the virtual step's default xi follows it (the
DARTS code uses the current weight learning rate); logged as ``weight_lr``.

Analytic check (tests): L_train = (w - alpha)^2, L_val = alpha w - 2 alpha + 1 has the bilevel
optimum (1, 1); first order converges to (2, 2), second order to alpha = 2 / (1 + 2 xi)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from bilevel.engines.base import Capabilities, EngineBase, EngineState, Hypergrad, Stats
from bilevel.engines.inner import inner_step
from bilevel.engines.registry import register
from bilevel.linalg.eigen import power_iteration
from bilevel.linalg.hvp import Linearization, grad_and_value, joint_grad
from bilevel.linalg.tree import tree_axpy, tree_norm, tree_scale, tree_sub
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.schedules import scheduled_value
from bilevel.spec.engine import DartsConfig
from bilevel.spec.level import OptimizerSpec

__all__ = ["DartsEngine", "grad_x", "lower_steps", "solver_at", "virtual_step", "warmup_steps", "weight_steps_before"]


def grad_x(fn: Callable[[Params], Tensor], x: Sequence[Tensor]) -> tuple[Params, Tensor]:
    """(grad fn(x), fn(x)) at fresh leaves made from x."""
    leaves = tuple(p.detach().requires_grad_(True) for p in x)
    with torch.enable_grad():
        grads, value = grad_and_value(fn, leaves)
    return tuple(g.detach() for g in grads), value.detach()


def solver_at(spec: OptimizerSpec, step: int) -> OptimizerSpec:
    """The lower solver at weight step ``step`` (0-based, counted over the whole search): its lr
    replaced by the scheduled rate over ``schedule_steps`` (the spec itself when it has no schedule)."""
    if spec.schedule == "constant" and spec.schedule_warmup == 0:
        return spec
    horizon = spec.schedule_steps or 1  # the spec requires schedule_steps for a scheduled lower solver
    rate = scheduled_value(spec.lr, step, horizon, spec.schedule, spec.final_lr_ratio, spec.power_base, spec.schedule_warmup)
    return spec.model_copy(update={"lr": rate})


def weight_steps_before(call: int, steps: int, warmup: int) -> int:
    """Weight steps taken before hypergradient call ``call`` (0-based) of an engine that takes
    ``warmup`` extra steps in its first call and ``steps`` in every call."""
    return 0 if call == 0 else warmup + call * steps


def lower_steps(
    problem: Problem, optimizer: InnerOptimizer, x: Params, w: Params, state: Params, steps: int, first: int = 0
) -> tuple[Params, Params, Params | None, Any]:
    """``steps`` steps of the lower solver (the shared inner step, warm-started): (w, optimizer
    state, grad_w G before the last step, the last batch). ``first``: the index of the first of
    them among the search's weight steps, which a scheduled solver's rate depends on."""
    x = tuple(p.detach() for p in x)
    grads, batch = None, None
    scheduled = optimizer.spec.schedule != "constant" or optimizer.spec.schedule_warmup > 0
    with torch.enable_grad():
        for index in range(steps):
            batch = problem.lower.batch()
            leaves = tuple(p.detach().requires_grad_(True) for p in w)
            step_optimizer = InnerOptimizer(solver_at(optimizer.spec, first + index)) if scheduled else optimizer
            w, state, grads = inner_step(problem, step_optimizer, x, leaves, state, batch, create_graph=False)
            w, state = tuple(p.detach() for p in w), tuple(s.detach() for s in state)
    return w, state, grads, batch


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


def warmup_steps(configured: int | None, problem: Problem) -> int:
    """The warm-up of an architecture engine: its own setting, else the largest warmup_steps of
    the upper level's architecture variables (0 when there is none)."""
    if configured is not None:
        return configured
    from bilevel.spec.search_space import ArchitectureVariable

    specs = [getattr(b.module, "spec", None) for b in problem.upper.modules.values()]
    return max((s.warmup_steps for s in specs if isinstance(s, ArchitectureVariable)), default=0)


def _flat(x: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in x])


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

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        start = time.perf_counter()
        config = self.config
        lower = problem.lower
        optimizer = InnerOptimizer(lower.solver)
        warmup = warmup_steps(config.warmup_steps, problem)
        steps = lower.solver.steps + (warmup if state.step == 0 else 0)
        first = weight_steps_before(state.step, lower.solver.steps, warmup)
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

        extra: dict[str, Params] = {k: v for k, v in state.extra.items()}
        stats_extra: dict[str, Tensor | float] = {}
        if lower.solver.schedule != "constant" or lower.solver.schedule_warmup > 0:
            stats_extra["weight_lr"] = solver_at(lower.solver, last_step).lr
        stop, restore = None, None
        if config.eigen_every is not None and (state.step + 1) % config.eigen_every == 0:
            stop, restore = self._curvature(problem, x, w, batch, extra, stats_extra)
            hvps += config.eigen_iters

        if residual_grads is None:
            residual_grads, _ = grad_x(lambda ww: problem.lower_objective(tuple(p.detach() for p in x), ww, train_batch), w)
        stats = Stats(
            inner_residual=tree_norm(residual_grads).detach(),
            linear_residual=None,
            hvp_count=hvps,
            inner_steps=steps,
            time_s=time.perf_counter() - start,
            extra=stats_extra,
        )
        new_state = EngineState(w, opt_state, extra, state.step + 1)
        return Hypergrad(tuple(g.detach() for g in grad), upper_loss.detach(), new_state, stats, stop, restore)

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
        self, problem: Problem, x: Params, w: Params, batch: Any, extra: dict[str, Params], stats: dict[str, Tensor | float]
    ) -> tuple[str | None, Params | None]:
        """Estimate the dominant eigenvalue of grad^2_alpha L_val(w, alpha); apply the DARTS-ES rule."""
        config = self.config
        lin = Linearization(lambda ww, aa: problem.upper_objective(aa, ww, batch), w, x)  # Hessian in alpha
        start = extra["eigvec"] if "eigvec" in extra else tuple(torch.randn_like(p) for p in x)
        eigenvalue, vector = power_iteration(lin.hvp, start, config.eigen_iters)
        eigenvalue = eigenvalue.detach()
        extra["eigvec"] = tuple(v.detach() for v in vector)
        history = torch.cat([extra["eigenvalues"][0], eigenvalue.reshape(1)]) if "eigenvalues" in extra else eigenvalue.reshape(1)
        snapshots = _flat(x).unsqueeze(0)
        if "eigen_snapshots" in extra:
            snapshots = torch.cat([extra["eigen_snapshots"][0], snapshots])[-(config.eigen_lookback + 1) :]
        extra["eigenvalues"], extra["eigen_snapshots"] = (history,), (snapshots,)
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
