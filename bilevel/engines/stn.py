"""Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud & Grosse 2019, "Self-Tuning Networks:
Bilevel Optimization of Hyperparameters using Structured Best-Response Functions", ICLR).

The lower model is a best-response approximation w_phi(lam): a module built from STN layers
(``bilevel.stn``) that takes the hyperparameters' codes as input. With lam the raw upper variables
and p(lam~ | lam, sigma) the perturbation of ``bilevel.stn.perturb``, each cycle runs

    T_train steps of the lower solver on   min_phi  E_{lam~ ~ p(.|lam, sigma)} G(lam~, w_phi(lam~))
    T_val   steps of the outer optimizer on min_lam  E_{lam~ ~ p(.|lam, sigma)} F(lam~, w_phi(lam~))
            and of Adam on sigma over the same objective minus tau H[p(.|lam, sigma)]

(T_train = the lower solver's ``steps``, T_val = ``val_steps``). The validation objective is the
upper objective: it sees no training-only regularization (dropout), so the hyperparameters act on
it through the response of w_phi, which is what makes dropout rates, augmentation settings and
discrete choices tunable here (eq. 13 of the paper). Continuous hyperparameters get the pathwise
(reparameterized) gradient; discrete ones REINFORCE with a moving-average baseline or a
straight-through relaxation (see ``bilevel.stn.perturb``). First order: no HVPs, no unrolling.

The model keeps training across outer steps (the inner optimizer's state is carried), so the
lower solver's ``warm_start`` is implied, and the run's final evaluation reports that model as it
is (``needs_best_response``: no further training at the final values). Each call returns the
gradient for the raw upper variables of that stochastic validation objective, not a
hypergradient of F itself.

Data parallelism (``bilevel.distributed.reduce``): each rank evaluates its share w_r F_r of F on
its shard, the batch-independent terms of the surrogate (the REINFORCE baseline b, the entropy)
are weighted by the same share, and the gradients of (lam, sigma) are summed over ranks with the
value of F, as the lower steps sum theirs; the baseline follows the summed F. Every rank then
holds the same lam, sigma and phi. The draws come from each rank's generator, which the run seeds
alike: they coincide on every rank while the objectives draw the same random numbers everywhere
(then a data-parallel step equals the single-process step on the union of the shards); objectives
that draw per example on shards of different sizes (dropout masks) desynchronize them, and each
rank's share is then evaluated at its own draw, an unbiased estimate of the same expectations
from W draws."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from bilevel.distributed.reduce import sum_over_ranks
from bilevel.engines.base import Capabilities, EngineBase, EngineState, Hypergrad, Stats
from bilevel.engines.inner import lower_steps, start_state
from bilevel.engines.registry import register
from bilevel.hyperparameters import Categorical
from bilevel.linalg.tree import tree_norm
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import StnConfig
from bilevel.spec.level import OptimizerSpec
from bilevel.stn.perturb import inverse_softplus, perturb, scale_of

__all__ = ["StnEngine"]


def _per_example(config: StnConfig, level: Any) -> dict[str, int]:
    """The per-example draws of a step on ``level``'s data: name -> its batch size."""
    if not config.per_example:
        return {}
    data = level.data
    rows = 1 if data is None else (data.batch_size or data.size)
    return {name: rows for name in config.per_example}


@register
class StnEngine(EngineBase):
    """Alternating best-response fitting and hyperparameter steps through the fitted response."""

    kind: ClassVar[str] = "stn"
    Config: ClassVar[type[StnConfig]] = StnConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="Self-Tuning Networks: a structured best-response model fitted around perturbed hyperparameters,"
        " hyperparameters stepped through it (MacKay et al. 2019)",
        needs_hvp=False,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="constant",
        first_order=True,
        handles_discrete=True,
        returns_hypergradient=False,
        needs_best_response=True,
    )

    def _scale_optimizer(self) -> InnerOptimizer:
        return InnerOptimizer(OptimizerSpec(name="adam", lr=self.config.scale_lr))

    def init(self, problem: Problem, x: Params) -> EngineState:
        state = start_state(problem)
        s0 = inverse_softplus(self.config.perturbation_scale)
        scale = tuple(torch.full_like(p, s0) for p in x)
        zero = torch.zeros((), dtype=problem.dtype, device=problem.device)
        state.extra.update(
            scale=scale,
            scale_state=self._scale_optimizer().init(scale),
            baseline=(zero.clone(), zero.clone()),  # (value, whether set)
            residual=(zero.clone(),),
        )
        return state

    def hypergrad(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        start = time.perf_counter()
        config, upper, lower = self.config, problem.upper, problem.lower
        scale = state.extra["scale"]

        # T_train steps on phi at hyperparameters drawn around the current ones
        steps = lower.solver.steps if state.step % config.val_steps == 0 else 0
        steps += config.warmup_steps if state.step == 0 else 0
        x_now, s_now = tuple(p.detach() for p in x), tuple(s.detach() for s in scale)
        train_rows, val_rows = _per_example(config, lower), _per_example(config, upper)

        def draw() -> Any:
            return perturb(upper, x_now, s_now, config.discrete_estimator, config.temperature, train_rows).drawn

        y, inner_state, last_grads = lower_steps(
            problem, InnerOptimizer(lower.solver), x, state.lower, state.inner_state, steps, draw=draw
        )
        residual = tree_norm(last_grads).detach() if last_grads is not None else state.extra["residual"][0]

        # one step on (lam, sigma): E F(lam~, w_phi(lam~)) - tau H, pathwise + score function. Under
        # data parallelism ``value`` is this rank's share w_r F_r of F and the terms that do not
        # depend on the batch (the baseline, the entropy) are weighted by the same share, so that
        # the gradients summed over ranks are those of the union's surrogate (bilevel.distributed.reduce).
        baseline, seen = state.extra["baseline"]
        x_leaf = tuple(p.detach().requires_grad_(True) for p in x)
        s_leaf = tuple(s.detach().requires_grad_(config.learn_scale) for s in scale)
        with torch.enable_grad():
            perturbation = perturb(upper, x_leaf, s_leaf, config.discrete_estimator, config.temperature, val_rows)
            value = problem.upper_objective(x_leaf, y, batch, perturbation.drawn)
            reference = torch.where(seen > 0, upper.shared(baseline), value.detach())
            surrogate = (value + (value.detach() - reference) * perturbation.log_prob
                         - upper.shared(config.entropy_weight * perturbation.entropy))
            inputs = x_leaf + (s_leaf if config.learn_scale else ())
            grads = torch.autograd.grad(surrogate, inputs, allow_unused=True) if surrogate.requires_grad else (None,) * len(inputs)
        grads = tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(inputs, grads))
        with torch.no_grad():
            upper_loss = problem.upper_objective(x_now, y, batch)  # at the current hyperparameters
        *grads, value, upper_loss = sum_over_ranks((*grads, value.detach(), upper_loss))  # one collective
        grad_x = tuple(grads[: len(x)])
        scale_state = state.extra["scale_state"]
        if config.learn_scale:
            scale, scale_state = self._scale_optimizer().step(s_now, grads[len(x) :], scale_state)
            scale = tuple(s.detach() for s in scale)
        decay = config.baseline_decay
        baseline = torch.where(seen > 0, decay * baseline + (1 - decay) * value, value)

        stats = Stats(
            inner_residual=residual,
            linear_residual=None,
            hvp_count=0,
            inner_steps=steps,
            time_s=time.perf_counter() - start,
            extra=self._figures(upper, scale, perturbation.entropy.detach()),
        )
        extra = {
            "scale": scale,
            "scale_state": scale_state,
            "baseline": (baseline, torch.ones_like(seen)),
            "residual": (residual,),
        }
        new_state = EngineState(y, inner_state, extra, state.step + 1)
        return Hypergrad(grad_x, upper_loss.detach(), new_state, stats)

    @staticmethod
    def _figures(upper: Any, scale: Params, entropy: torch.Tensor) -> dict[str, Any]:
        """Mean perturbation scale sigma over the Gaussian-perturbed entries, and the entropy."""
        gaussian = [scale_of(scale[i]).reshape(-1) for name, i in upper.tensors.items()
                    if not isinstance(upper.transform(name), Categorical)]
        figures: dict[str, Any] = {"perturbation_entropy": entropy}
        if gaussian:
            figures["perturbation_scale"] = torch.cat(gaussian).mean()
        return figures
