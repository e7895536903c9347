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

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from bilevel.distributed.reduce import sum_over_ranks
from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.inner import lower_steps
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.hyperparameters import Categorical
from bilevel.linalg.tree import tree_norm
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig
from bilevel.spec.level import OptimizerSpec
from bilevel.stn.perturb import inverse_softplus, perturb, scale_of

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["StnConfig", "StnEngine", "StnState"]


class StnConfig(EngineConfig):
    """Self-Tuning Networks (MacKay et al. 2019): the lower model is a best-response approximation
    w_phi(lam) built from STN layers; each outer step trains phi for ``steps`` of the lower solver on
    the training loss at hyperparameters drawn around the current ones, then steps (lam, sigma) on
    the validation loss through w_phi minus tau times the entropy of the perturbation."""

    kind: Literal["stn"] = "stn"
    """Discriminator: the STN engine."""
    val_steps: Annotated[int, Field(ge=1)] = 1
    """T_val: hyperparameter steps per cycle. The lower solver's ``steps`` are T_train, taken
    before the first of every T_val outer steps (paper: T_train = 2, T_val = 1)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Training steps of phi (with perturbed hyperparameters) before the first hyperparameter step
    (the paper warms up for 5 epochs)."""
    perturbation_scale: Annotated[float, Field(gt=0)] = 0.25
    """Initial sigma, the standard deviation of the perturbation in raw (unconstrained) units
    (paper: 0.5). A smaller start trains the model at less noisy settings and lets the draws of a
    discrete hyperparameter settle on one value (docs/engines/stn.md)."""
    learn_scale: bool = True
    """Learn sigma on the validation objective (else keep it fixed)."""
    scale_lr: Annotated[float, Field(gt=0)] = 3e-3
    """Adam step size for s, sigma = softplus(s) (paper: 3e-3, as for the hyperparameters)."""
    entropy_weight: Annotated[float, Field(ge=0)] = 1e-3
    """tau: weight of the perturbation's entropy, which keeps sigma from collapsing (paper: 1e-3 to 1e-5)."""
    discrete_estimator: Literal["reinforce", "straight_through"] = "reinforce"
    """Gradient for discrete hyperparameters. reinforce: score function with a moving-average
    baseline, unbiased whatever the objectives do with the value; straight_through: the model's
    conditioning sees the discrete value, its gradient that of the continuous latent (integer) or
    of a Gumbel-softmax relaxation (categorical): lower variance, but blind to a direct use of the
    value in the validation objective."""
    baseline_decay: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """REINFORCE baseline b <- decay b + (1 - decay) F."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Gumbel-softmax temperature of straight_through for categorical hyperparameters."""
    per_example: list[str] = Field(default_factory=list)
    """Continuous scalar hyperparameters drawn once per example of a batch instead of once per step
    (the reference code's minibatched perturbation), e.g. dropout rates: each example then trains
    the response at its own setting, which separates the effects of hyperparameters a per-step
    draw moves together. Under STN their objectives receive a (batch,) tensor (use it per example:
    bilevel.stn.dropout does) and hyper_input(upper) a (batch, n_hyper) matrix; the batch is the
    level's minibatch (its whole data set without batch_size)."""


@dataclass
class StnState(EngineState):
    """The best-response model's parameters (lower) and the perturbation: its raw scale s
    (sigma = softplus(s)) with Adam's state, the REINFORCE baseline (value, whether set) and the
    last training residual."""

    scale: Params | None = None
    scale_state: Params | None = None
    baseline: Params | None = None
    residual: Params | None = None


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
    State: ClassVar[type[StnState]] = StnState
    priority: ClassVar[int] = 20
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

    def init(self, problem: Problem, x: Params) -> StnState:
        s0 = inverse_softplus(self.config.perturbation_scale)
        scale = tuple(torch.full_like(p, s0) for p in x)
        zero = torch.zeros((), dtype=problem.dtype, device=problem.device)
        return dataclasses.replace(super().init(problem, x), scale=scale, scale_state=self._scale_optimizer().init(scale),
                                   baseline=(zero.clone(), zero.clone()), residual=(zero.clone(),))

    def compute(self, problem: Problem, x: Params, state: StnState, batch: Any) -> Hypergrad:
        config, upper, lower = self.config, problem.upper, problem.lower
        scale = state.scale

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
        residual = tree_norm(last_grads).detach() if last_grads is not None else state.residual[0]

        # one step on (lam, sigma): E F(lam~, w_phi(lam~)) - tau H, pathwise + score function. Under
        # data parallelism ``value`` is this rank's share w_r F_r of F and the terms that do not
        # depend on the batch (the baseline, the entropy) are weighted by the same share, so that
        # the gradients summed over ranks are those of the union's surrogate (bilevel.distributed.reduce).
        baseline, seen = state.baseline
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
        scale_state = state.scale_state
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
            extra=self._figures(upper, scale, perturbation.entropy.detach()),
        )
        new_state = StnState(y, inner_state, state.step + 1, scale=scale, scale_state=scale_state,
                             baseline=(baseline, torch.ones_like(seen)), residual=(residual,))
        return Hypergrad(grad_x, upper_loss, new_state, stats)

    def lower_solution(self, problem: Problem, x: Params, state: EngineState) -> Params:
        """The best-response model as the last step left it, trained for as many steps as the run
        took: no further training at the final values."""
        return state.lower

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, facts: ProblemFacts, situation: str) -> Proposal | None:
        if situation != "gradient_free":
            return None
        upper = f"levels.{facts.upper_level}.variables"
        named = ", ".join(f"{upper}.{n} ({'discrete' if n in facts.discrete_hyperparameters else 'declared differentiable: false'})"
                          for n in facts.gradient_free_hyperparameters)
        return Proposal(StnConfig(), [
            f"{named}: no gradient of the objectives reaches these, so hypergradient engines cannot tune them; {cls.kind}"
            " fits the lower level's best-response model (its STN layers) at hyperparameters perturbed around the"
            " current ones, and steps the hyperparameters on the validation objective through that model"
            " (MacKay et al. 2019), discrete ones by a score-function or straight-through gradient"])

    @classmethod
    def refusals(cls, config: StnConfig, facts: ProblemFacts) -> list[tuple[str, str]]:
        """A lower model without STN layers, module variables upstairs, tuned optimizer step
        settings (which the response cannot learn), per-example draws of non-scalars."""
        kind, upper = cls.kind, f"levels.{facts.upper_level}.variables"
        out = []
        if not facts.best_response_model:
            out.append((f"levels.{facts.lower_level}.variables",
                        f"the {kind} engine fits a best-response model: build the lower level's model from STN layers"
                        " (bilevel.stn.StnLinear, StnConv2d, StnTensor) called with bilevel.stn.hyper_input(upper); see docs/engines/stn.md"))
        out += [(f"{upper}.{name}", f"the {kind} engine perturbs tensor and hyperparameter variables; a module variable"
                                    " upstairs is not supported") for name in facts.upper_modules]
        out += [(f"levels.{facts.lower_level}.solver.tuned.{name}",
                 f"the {kind} engine fits a best response to the training objective, which the optimizer's {name} does"
                 " not enter (it changes the path, not the objective): the response cannot learn its effect. Tune"
                 f" {name} with the unrolled engine; weight_decay can be tuned here (it is a term of the training objective)")
                for name in facts.tuned_step]
        bad = [name for name in config.per_example if name not in facts.continuous_scalars]
        if bad:
            out.append(("engine.per_example",
                        f"{', '.join(map(repr, bad))}: only continuous scalar upper variables can be drawn per example"
                        f" (here: {', '.join(facts.continuous_scalars) or 'none'})"))
        return out

    @staticmethod
    def _figures(upper: Any, scale: Params, entropy: torch.Tensor) -> dict[str, Any]:
        """Mean perturbation scale sigma over the Gaussian-perturbed entries, and the entropy."""
        gaussian = [scale_of(scale[i]).reshape(-1) for name, i in upper.tensors.items()
                    if not isinstance(upper.transform(name), Categorical)]
        figures: dict[str, Any] = {"perturbation_entropy": entropy}
        if gaussian:
            figures["perturbation_scale"] = torch.cat(gaussian).mean()
        return figures
