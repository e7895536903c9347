"""Zero-order (evolution-strategies) hypergradients: F(x, y*(x)) evaluated at perturbed x only.

With u_1..u_N drawn with E[u u^T] = I and sigma > 0, the estimators of dF/dx (f(x) = F(x, y_T(x)),
y_T the lower level's own solve at x, warm-started from the same point with the same batches for
every perturbation) are

    naive:       g = 1/(N sigma)  sum_i f(x + sigma u_i) u_i
    forward:     g = 1/(N sigma)  sum_i (f(x + sigma u_i) - f(x)) u_i
    antithetic:  g = 1/(2N sigma) sum_i (f(x + sigma u_i) - f(x - sigma u_i)) u_i

(Rechenberg 1973; Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to
Reinforcement Learning"; Nesterov & Spokoiny 2017, "Random Gradient-Free Minimization of Convex
Functions"). For Gaussian u each is an unbiased estimate of the gradient of the Gaussian smoothing
f_sigma(x) = E f(x + sigma u), whatever f is: nothing is differentiated, so the lower level may be
non-differentiable (an argmax, a sort, an external solver called from its objective or its
closed-form ``solution``), and so may the upper variables (``handles_discrete``: integer and
categorical hyperparameters are perturbed through their raw tensors). For f quadratic, f_sigma
and f differ by a constant, so the estimate is unbiased for dF/dx itself. ``orthogonal`` draws
the u in blocks of d orthogonal directions of length sqrt(d) (Choromanski et al. 2018,
"Structured Evolution with Compact Architectures for Scalable Policy Optimization"): lower
variance, and with N a multiple of d the antithetic estimate of a quadratic is exact.

The stats add ``estimate_variance``, the trace of the estimate's covariance estimated from the N
per-sample terms (sum over coordinates of their sample variance, / N), and ``lower_solves``.
Perturbations are evaluated in one batch with ``torch.func.vmap`` (``vectorize``), through the
inner optimizer's own step (``bilevel.engines.functional``), or one after another through the
shared graph-free loop where the objectives cannot be vmapped (numpy, an external solver)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from bilevel.engines.base import Capabilities, EngineBase, Proposal
from bilevel.engines.functional import functional_solve, require_one_process
from bilevel.engines.inner import inner_residual, lower_start, lower_steps
from bilevel.engines.registry import register
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.linalg.tree import tree_flatten, tree_norm, tree_unflatten
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.engine import EngineConfig

if TYPE_CHECKING:
    from bilevel.planner.facts import ProblemFacts

__all__ = ["ZeroOrderConfig", "ZeroOrderEngine", "directions", "estimate"]

Method = Literal["naive", "forward", "antithetic"]


class ZeroOrderConfig(EngineConfig):
    """Evolution-strategies estimates of the hypergradient from evaluations of F(x, y*(x)) alone."""

    kind: Literal["zero_order"] = "zero_order"
    """Discriminator: the zero-order engine."""
    method: Method = "antithetic"
    """naive: f(x + sigma u) u / sigma; forward: (f(x + sigma u) - f(x)) u / sigma; antithetic:
    (f(x + sigma u) - f(x - sigma u)) u / (2 sigma), averaged over the samples."""
    samples: Annotated[int, Field(ge=1)] = 16
    """Perturbation directions per hypergradient (antithetic evaluates each twice)."""
    sigma: Annotated[float, Field(gt=0)] = 0.01
    """Perturbation scale, in the units of the upper variables' raw tensors."""
    distribution: Literal["gaussian", "orthogonal"] = "gaussian"
    """gaussian: u ~ N(0, I); orthogonal: blocks of d random orthogonal directions of length sqrt(d)."""
    vectorize: Literal["auto", "vmap", "loop"] = "auto"
    """How perturbations are evaluated (the result is the same): vmap, all at once; loop, one
    after another; auto: vmap, falling back to the loop (and saying why) where the objectives
    cannot be vmapped."""


def directions(samples: int, d: int, distribution: str, like: Tensor) -> Tensor:
    """(samples, d) perturbation directions with E[u u^T] = I, from the global generator."""
    if distribution == "gaussian":
        return torch.randn(samples, d, dtype=like.dtype, device=like.device)
    blocks = []
    for _ in range(math.ceil(samples / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, dtype=like.dtype, device=like.device))
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed
        blocks.append(q.T * math.sqrt(d))
    return torch.cat(blocks)[:samples]


def estimate(method: str, values: Tensor, base: Tensor, u: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """The estimate (d,) and the trace of its covariance from the per-sample terms, given the
    evaluations ``values`` (N for naive and forward; 2N for antithetic, + then -) and f(x)."""
    n = u.shape[0]
    if method == "naive":
        weights = values / sigma
    elif method == "forward":
        weights = (values - base) / sigma
    else:
        weights = (values[:n] - values[n:]) / (2 * sigma)
    terms = weights.unsqueeze(1) * u
    variance = terms.var(0).sum() / n if n > 1 else torch.full((), float("nan"), dtype=u.dtype, device=u.device)
    return terms.mean(0), variance


@register
class ZeroOrderEngine(EngineBase):
    """ES hypergradients (naive, forward, antithetic), perturbations batched with vmap."""

    kind: ClassVar[str] = "zero_order"
    Config: ClassVar[type[ZeroOrderConfig]] = ZeroOrderConfig
    priority: ClassVar[int] = 15
    capabilities: ClassVar[Capabilities] = Capabilities(
        summary="zero-order (evolution-strategies) estimates from evaluations of F at perturbed x; any lower level",
        needs_hvp=False,
        lower_convexity=("strongly_convex", "convex", "nonconvex", "unknown"),
        memory="constant",
        first_order=True,
        handles_discrete=True,
        through_optimizer=True,
        derivative_free=True,
    )

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.fallback: str | None = None
        """Why perturbations run in a loop under vectorize: auto (None while vmap serves)."""

    def compute(self, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        require_one_process(self.kind)
        config = self.config
        x = tuple(p.detach() for p in x)
        flat = tree_flatten(x)
        u = directions(config.samples, flat.numel(), config.distribution, flat)
        lower = problem.lower
        optimizer = InnerOptimizer(lower.solver)
        y0 = lower_start(problem, state, x)
        s0 = optimizer.init(y0)
        steps = lower.solver.steps if lower.solver is not None else 0
        batches = [lower.batch() for _ in range(max(steps, 1 if lower.solution is not None else 0))]

        y, _, grads = lower_steps(problem, optimizer, x, y0, s0, batches=batches)
        with torch.no_grad():
            base = problem.upper_objective(x, y, batch)
        points = flat + config.sigma * u
        if config.method == "antithetic":
            points = torch.cat([points, flat - config.sigma * u])
        values = self._evaluate(problem, optimizer, points, x, y0, s0, batches, batch)
        direction, variance = estimate(config.method, values, base, u, config.sigma)

        stats = Stats(
            inner_residual=inner_residual(problem, x, y, batches[-1] if batches else lower.batch()) if grads is None
            else tree_norm(grads).detach(),
            linear_residual=None,
            hvp_count=0,
            inner_steps=steps,
            extra={"estimate_variance": variance, "lower_solves": float(points.shape[0] + 1)},
        )
        return Hypergrad(tree_unflatten(direction, x), base, EngineState(y, state.inner_state, state.step + 1), stats)

    def _evaluate(self, problem: Problem, optimizer: InnerOptimizer, points: Tensor, x: Params, y0: Params, s0: Params,
                  batches: list[Any], batch: Any) -> Tensor:
        """f at each row of ``points``: vmapped, or one by one."""
        mode = self.config.vectorize
        if mode == "vmap" or (mode == "auto" and self.fallback is None):
            try:
                return self._vmapped(problem, optimizer, points, x, y0, s0, batches, batch)
            except Exception as error:  # noqa: BLE001 - the loop below reruns the same code and raises what is real
                if mode == "vmap":
                    raise
                self.fallback = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return self._looped(problem, optimizer, points, x, y0, s0, batches, batch)

    @staticmethod
    def _vmapped(problem: Problem, optimizer: InnerOptimizer, points: Tensor, x: Params, y0: Params, s0: Params,
                 batches: list[Any], batch: Any) -> Tensor:
        def value(point: Tensor) -> Tensor:
            xp = tree_unflatten(point, x)
            return problem.upper_objective(xp, functional_solve(problem, optimizer, xp, y0, s0, batches), batch)

        return torch.func.vmap(value)(points).detach()

    @staticmethod
    def _looped(problem: Problem, optimizer: InnerOptimizer, points: Tensor, x: Params, y0: Params, s0: Params,
                batches: list[Any], batch: Any) -> Tensor:
        values = []
        for point in points:
            xp = tree_unflatten(point, x)
            yp, _, _ = lower_steps(problem, optimizer, xp, y0, s0, batches=batches)
            with torch.no_grad():
                values.append(problem.upper_objective(xp, yp, batch).reshape(()))
        return torch.stack(values)

    def execution_report(self) -> dict[str, Any] | None:
        if self.config.vectorize == "auto" and self.fallback is not None:
            return {"perturbations": "loop", "why": f"vmap could not evaluate the objectives ({self.fallback})"}
        return None

    # --- planning -------------------------------------------------------------------------------
    @classmethod
    def explain(cls, config: ZeroOrderConfig, facts: ProblemFacts) -> Proposal:
        evaluations = config.samples * (2 if config.method == "antithetic" else 1) + 1
        reasons = [f"{evaluations} lower solves per hypergradient ({config.samples} {config.distribution} directions,"
                   f" {config.method}); the estimate's variance grows with the {facts.n_upper} upper scalars"
                   " (estimate_variance in the stats)"]
        warnings = []
        if config.distribution == "orthogonal" and config.samples % facts.n_upper:
            warnings.append(f"engine.samples = {config.samples} is not a multiple of the {facts.n_upper} upper scalars:"
                            " the last block of orthogonal directions is incomplete")
        return Proposal(config, reasons, warnings)
