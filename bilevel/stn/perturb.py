"""STN's perturbation distribution p(lam~ | lam, sigma) over the upper variables, in raw space.

Continuous entries (and plain tensors): lam~ = r + sigma * eps, eps ~ N(0, I), reparameterized, so
gradients reach r and sigma through the value and the code. Integer entries: the same Gaussian on
the latent, rounded to the integer it falls on. Categorical variables: a draw from softmax(r) by
the Gumbel-max trick. sigma = softplus(s) elementwise. Entropy (MacKay et al. 2019, eq. 13):

    H = sum_continuous,integer log(sigma sqrt(2 pi e))  +  sum_categorical -sum_k p_k log p_k.

Discrete draws carry no pathwise gradient; two estimators give one (``estimator``):

* ``reinforce`` (Williams 1992): the draw's log-probability is returned so that the validation
  surrogate (F - b) log p(draw) has the score-function gradient E[(F - b) grad log p] of
  E[F(draw)], with a baseline b. Unbiased, whatever way the objectives use the value (an
  architecture choice used at validation time too); higher variance.
* ``straight_through``: the code the model is conditioned on is the discrete one in the forward
  pass, but its gradient is that of the continuous latent (integer) or of the Gumbel-softmax
  relaxation softmax((r + g) / temperature) (categorical; Jang et al. 2017, Maddison et al. 2017),
  close to what the STN reference code does for cutout sizes (its hypernetwork sees the continuous
  value). Low variance, but blind to any direct use of the value in the validation objective:
  right for settings that only shape training (augmentation on/off, the number of cutout holes).

A continuous scalar can be drawn once per example of a batch instead of once per step (the STN
reference code's minibatched perturbation): each example then trains the response at its own
setting, which separates the effects of hyperparameters that a per-step draw moves together.

No draw reads anything on the host."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as nnf
from torch import Tensor

from bilevel.hyperparameters import Categorical, Drawn, Integer
from bilevel.problem import Level, Params

__all__ = ["Perturbation", "inverse_softplus", "perturb", "scale_of"]

Estimator = Literal["reinforce", "straight_through"]
_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


@dataclass
class Perturbation:
    """One draw lam~ for every tensor variable of a level."""

    drawn: dict[str, Drawn]
    """Variable -> (value in user units, code for the model)."""
    log_prob: Tensor
    """Sum of log p of the discrete draws scored by REINFORCE (0 when there are none)."""
    entropy: Tensor
    """Entropy of the whole perturbation distribution."""


def inverse_softplus(value: float) -> float:
    """s with softplus(s) = value (> 0)."""
    return value + math.log(-math.expm1(-value))


def scale_of(s: Tensor) -> Tensor:
    """sigma = softplus(s)."""
    return nnf.softplus(s)


def perturb(
    level: Level,
    raw: Params,
    scale_raw: Params,
    estimator: Estimator = "reinforce",
    temperature: float = 1.0,
    per_example: Mapping[str, int] | None = None,
) -> Perturbation:
    """Draw lam~ ~ p(. | raw, softplus(scale_raw)) for every tensor variable of ``level``.
    Differentiable in ``raw`` and ``scale_raw`` where they require grad. ``per_example`` maps
    continuous scalar variables to a number B of independent draws (one per example of a batch):
    their value is then a (B,) tensor and their code a (B, 1) matrix."""
    drawn: dict[str, Drawn] = {}
    reference = raw[0]
    log_prob = torch.zeros((), dtype=reference.dtype, device=reference.device)
    entropy = torch.zeros((), dtype=reference.dtype, device=reference.device)
    for name, index in level.tensors.items():
        transform = level.transform(name)
        r = raw[index]
        if isinstance(transform, Categorical):
            log_p = torch.log_softmax(r, dim=0)
            entropy = entropy - (log_p.exp() * log_p).sum()
            gumbel = -torch.log(-torch.log(torch.rand_like(r).clamp_min(torch.finfo(r.dtype).tiny)))
            choice = torch.argmax(r.detach() + gumbel)
            hard = nnf.one_hot(choice, transform.size).to(r.dtype)
            if estimator == "reinforce":
                log_prob = log_prob + log_p.gather(0, choice.reshape(1)).reshape(())
                code = hard
            else:
                soft = torch.softmax((r + gumbel) / temperature, dim=0)
                code = hard + soft - soft.detach()
            drawn[name] = Drawn(transform.value_at(choice), code)
            continue
        sigma = scale_of(scale_raw[index])
        entropy = entropy + (torch.log(sigma) + _HALF_LOG_2PI_E).sum()
        if per_example and name in per_example:
            moved = r + sigma * torch.randn(per_example[name], dtype=r.dtype, device=r.device)
            drawn[name] = Drawn(transform.value(moved), moved.reshape(-1, 1))
            continue
        noise = torch.randn_like(r)
        moved = r + sigma * noise
        if isinstance(transform, Integer):
            value = transform.value(moved.detach())
            hard = transform.raw_of_value(value, r.dtype).reshape(-1)
            if estimator == "reinforce":
                # log N(moved; r, sigma), differentiable in r and sigma at the fixed draw
                z = (moved.detach() - r) / sigma
                log_prob = log_prob + (-0.5 * z * z - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum()
                code = hard
            else:
                flat = moved.reshape(-1)
                code = hard + flat - flat.detach()
            drawn[name] = Drawn(value, code)
        else:
            drawn[name] = Drawn(transform.value(moved), transform.code(moved))
    return Perturbation(drawn, log_prob, entropy)
