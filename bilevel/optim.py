"""Functional first-order optimizers for inner solves: pure functions of (params, grads, state),
so the same code runs without a graph (implicit engine) and is differentiated through
(unrolled engine).

    sgd:       y <- y - lr g
    momentum:  m <- mu m + g;  y <- y - lr m                       (heavy ball, Polyak 1964)
    adam:      m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
               y <- y - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t) + eps_root) + eps)   (Kingma & Ba 2015)

Adam is torch.optim.Adam's form (eps added after the bias correction of sqrt(v)); ``eps_root``
(TorchOpt's and optax's name, 0 by default) is added inside the square root. Where an entry of v
is exactly zero (its gradient was zero at every step so far: a dead ReLU, an unused parameter)
the square root is not differentiable; with eps_root = 0 its derivative there is taken as 0
(``_adam_denominator``), which is exact, since v = sum_k c_k g_k^2 = 0 forces every g_k = 0 and
so dv = 2 sum_k c_k g_k dg_k = 0 (higher masks the same entries). Elsewhere the derivative is
that of the formula above, bit for bit.

Two options add state after the optimizer's own (``bilevel.optim_extras``): a step count when a
tuned hyperparameter is a schedule (adam's own count serves), and hypergradient descent's
learning rate and previous direction (Baydin et al. 2018).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.optim_extras import Extras
from bilevel.spec.level import OptimizerSpec
from bilevel.spec.optimizer import SECOND_ORDER

__all__ = ["InnerOptimizer"]

Tree = tuple[Tensor, ...]


class InnerOptimizer:
    """Optimizer state is a flat tuple of tensors (empty for sgd) so it can be checkpointed,
    carried across warm starts, and differentiated through."""

    def __init__(self, spec: OptimizerSpec):
        if spec.name == "auto":  # not resolved by a plan: the first-order default, at the spec's lr and steps
            spec = spec.model_copy(update={"name": "sgd"})
        self.spec = spec
        self.extras = Extras(spec)

    def init(self, params: Sequence[Tensor]) -> Tree:
        return (*self._init(params), *self.extras.init(params))

    def _init(self, params: Sequence[Tensor]) -> Tree:
        name = self.spec.name
        if name in ("sgd", *SECOND_ORDER):  # L-BFGS and Newton-CG keep their state inside one solve
            return ()
        if name == "momentum":
            return tuple(torch.zeros_like(p) for p in params)
        zeros = tuple(torch.zeros_like(p) for p in params)
        count = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        return (*zeros, *tuple(torch.zeros_like(p) for p in params), count)

    def step(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: Tree, hyper: Mapping[str, Tensor] | None = None
    ) -> tuple[Tree, Tree]:
        """One update; returns (new params, new state). No in-place ops on inputs.

        ``hyper`` replaces the spec's lr / momentum by (differentiable) scalar tensors: the values
        of the upper variables named in ``spec.tuned`` (a schedule's entry for this step, with
        ``spec.tuned_schedule``); lr may also be one tensor per parameter (a learning rate per
        entry, Meta-SGD)."""
        extras = self.extras
        params, grads = list(params), list(grads)
        if extras:
            own, extra = extras.split(tuple(state), len(params))
            hyper, adapted = extras.before(own, extra, grads, hyper)
            new, new_own, direction = self._step(params, grads, own, hyper)
            return new, (*new_own, *extras.after(extra, direction, adapted))
        new, new_state, _ = self._step(params, grads, tuple(state), hyper)
        return new, new_state

    def _step(self, params: list[Tensor], grads: list[Tensor], state: Tree, hyper: Mapping[str, Tensor] | None
              ) -> tuple[Tree, Tree, Sequence[Tensor]]:
        """(new params, new own state, the direction u of y <- y - lr u)."""
        spec = self.spec
        if spec.name in SECOND_ORDER:
            raise ValueError(f"{spec.name} is not a one-step update: it minimizes a whole solve (bilevel.engines.inner_solvers)")
        lr = spec.lr if not hyper or "lr" not in hyper else hyper["lr"]
        if spec.name == "sgd":
            return tuple(_add_scaled(params, grads, _negated(lr))), (), grads
        if spec.name == "momentum":
            momentum = spec.momentum if not hyper or "momentum" not in hyper else hyper["momentum"]
            velocity = _foreach.add(_scaled(list(state), momentum), grads)
            return tuple(_add_scaled(params, velocity, _negated(lr))), tuple(velocity), velocity
        n = len(params)
        b1, b2 = spec.betas
        m, v, count = list(state[:n]), list(state[n : 2 * n]), state[2 * n]
        # the step count is a constant of the trajectory (its derivative is zero): detached, so that
        # differentiating through a checkpointed segment, whose restarted state requires grad, never
        # meets the backward of torch._foreach_div(list, Tensor) with a Tensor that requires grad
        # ("inconsistent range for TensorList output", torch 2.13)
        count = count.detach() + 1
        m = _foreach.add(_foreach.mul(m, b1), grads, alpha=1 - b1)
        v = _foreach.add(_foreach.mul(v, b2), _foreach.mul(grads, grads), alpha=1 - b2)
        correction1 = 1 - b1**count
        correction2 = 1 - b2**count
        denom = _adam_denominator(v, correction2, spec.eps_root, spec.eps)
        update = _foreach.div(_foreach.div(m, correction1), denom)
        new = _add_scaled(params, update, _negated(lr))
        return tuple(new), (*m, *v, count), update


class _Foreach:
    """``_foreach.add(...)`` is ``torch._foreach_add(...)`` (one fused call over the list), or the
    same op tensor by tensor where a torch.func transform wraps the tensors: vmap has no batching
    rule for foreach lists (the zero-order engine evaluates a batch of perturbations), and the
    transforms trace single ops as well."""

    def __getattr__(self, name: str) -> Any:
        fused, single = getattr(torch, f"_foreach_{name}"), getattr(torch, name)

        def apply(first: list[Tensor], *args: Any, **kwargs: Any) -> list[Tensor]:
            lists = [first, *(a for a in args if isinstance(a, (list, tuple)))]
            if not any(t and torch._C._functorch.is_functorch_wrapped_tensor(t[0]) for t in lists):
                return fused(first, *args, **kwargs)
            rest = [a if isinstance(a, (list, tuple)) else [a] * len(first) for a in args]
            return [single(t, *others, **kwargs) for t, *others in zip(first, *rest)]

        return apply


_foreach = _Foreach()


def _adam_denominator(v: list[Tensor], correction2: Tensor, eps_root: float, eps: float) -> list[Tensor]:
    """sqrt(v / correction2 + eps_root) + eps, with the derivative of the square root at an entry
    v = 0 (eps_root = 0) taken as 0 instead of inf (whose product with dv = 0 is NaN): exact,
    since v = 0 only where every gradient so far was zero (see the module docstring). The values
    are those of the plain formula; the masked form runs only where a graph is being recorded."""
    v_hat = _foreach.div(v, correction2)
    if eps_root:
        v_hat = _foreach.add(v_hat, eps_root)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in v_hat):
        return [torch.where(t > 0, torch.where(t > 0, t, 1).sqrt(), 0) + eps for t in v_hat]
    return _foreach.add(_foreach.sqrt(v_hat), eps)


def _negated(alpha: float | Tensor | tuple[Tensor, ...]) -> float | Tensor | tuple[Tensor, ...]:
    return tuple(-t for t in alpha) if isinstance(alpha, tuple) else -alpha


def _scaled(a: list[Tensor], alpha: float | Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    """alpha a, with alpha a number, a 0-d tensor, or one tensor per entry of a (broadcast against
    it: one scale per entry of each parameter). A tensor alpha is applied per tensor: the
    backward of torch._foreach_mul(list, Tensor) fails for lists of more than one tensor
    ("inconsistent range for TensorList output", torch 2.13), which a module variable always is."""
    if isinstance(alpha, tuple):
        return [t * s for t, s in zip(a, alpha)]
    if isinstance(alpha, Tensor):
        return [t * alpha for t in a]
    return _foreach.mul(a, alpha)


def _add_scaled(a: list[Tensor], b: list[Tensor], alpha: float | Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    """a + alpha b, with alpha a number, a 0-d tensor or one tensor per entry of b (tensors:
    differentiable in alpha)."""
    if isinstance(alpha, (Tensor, tuple)):
        return _foreach.add(a, _scaled(b, alpha))
    return _foreach.add(a, b, alpha=alpha)
