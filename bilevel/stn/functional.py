"""What an STN model's objectives call: the conditioning vector and dropout at a tensor rate."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["dropout", "hyper_input", "hyper_size"]


def hyper_input(upper: Any, *names: str) -> Tensor:
    """The conditioning vector h of STN layers: the flat codes of the upper variables ``names``
    (default: every tensor variable of the upper level, in declaration order), concatenated.

    A continuous hyperparameter contributes its unconstrained value (one number per entry), an
    integer one number (the unconstrained point of the integer in use), a categorical a one-hot
    vector over its choices. Under the STN engine these are the perturbed values it drew for this
    step, so the model's response is trained around the current hyperparameters; under any other
    engine, and in monitors and reports, they are the current values. When the STN engine draws
    some hyperparameters per example (``per_example``), h is a (batch, n_hyper) matrix: STN layers
    take it as one setting per example."""
    codes = upper.codes()
    if names:
        missing = [n for n in names if n not in codes]
        if missing:
            raise KeyError(f"no tensor variable {', '.join(map(repr, missing))} upstairs; available: {', '.join(codes)}")
        parts = [codes[n] for n in names]
    else:
        parts = list(codes.values())
    if not parts:
        raise ValueError("the upper level has no tensor or hyperparameter variables to condition on")
    rows = max((p.shape[0] for p in parts if p.dim() == 2), default=None)
    if rows is None:
        return torch.cat(parts)
    # some values were drawn per example (STN's per_example): one row of h per example
    return torch.cat([p if p.dim() == 2 else p.expand(rows, -1) for p in parts], dim=1)


def hyper_size(upper: Any, *names: str) -> int:
    """len(hyper_input(upper, *names)): the n_hyper an STN layer needs."""
    return int(hyper_input(upper, *names).numel())


def dropout(x: Tensor, rate: Tensor | float, training: bool = True) -> Tensor:
    """Inverted dropout with a rate that may be a tensor (a hyperparameter's value): each entry is
    kept with probability 1 - rate and scaled by 1 / (1 - rate). Unlike torch.nn.functional.dropout
    it reads no number on the host, so it costs no synchronization inside a training loop; the
    sampled mask carries no gradient to the rate (the reason STN, not a hypergradient, tunes it).
    A rate of shape (batch,) applies one rate per example."""
    if not training:
        return x
    rate = torch.as_tensor(rate, dtype=x.dtype, device=x.device).detach()  # E[mask / keep] = 1: no gradient
    if rate.dim() == 1 and x.dim() > 1:
        rate = rate.reshape(-1, *([1] * (x.dim() - 1)))
    keep = 1.0 - rate
    mask = (torch.rand_like(x) < keep).to(x.dtype)
    return x * mask / keep
