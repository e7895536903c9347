"""Proximal operators of the non-smooth terms a lower level declares (``prox`` on a variable).

For a convex g and a step s > 0, prox_{s g}(z) = argmin_u g(u) + ||u - z||^2 / (2 s)
(Moreau 1965; Parikh & Boyd 2014, "Proximal Algorithms", section 6 for the formulas below):

    l1           g = lam ||.||_1:                 soft(z, s lam) = sign(z) max(|z| - s lam, 0)
    elastic_net  g = l1 ||.||_1 + l2/2 ||.||^2:   soft(z, s l1) / (1 + s l2)
    group_lasso  g = lam sum_G ||.||_2:           z_G max(1 - s lam / ||z_G||, 0)
    custom       the user's prox(upper, z, step)

Each is written in torch operations, differentiable in z and in the strengths, which may be upper
variables: the implicit engine differentiates the fixed point y = prox_{s g}(y - s grad G) through
them, the unrolled engine every step. At the kinks (|z| = s lam) the derivative is one-sided, as
autograd takes it; at a solution with strict complementarity no entry sits there.

A compiled prox is a function prox(upper, value, step) -> Tensor, with ``upper`` the view of the
upper level's variables (strengths read by name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.spec.prox import CustomProx, ElasticNetProx, GroupLassoProx, L1Prox, ProxOperator, Strength

__all__ = ["Prox", "group_soft_threshold", "make_prox", "soft_threshold", "strength_names"]

Prox = Callable[[Any, Tensor, "float | Tensor"], Tensor]
"""prox(upper, value, step): prox_{step g}(value), g reading its strengths from ``upper``."""


def soft_threshold(z: Tensor, threshold: Tensor | float) -> Tensor:
    """sign(z) max(|z| - threshold, 0), elementwise: the prox of threshold |.|."""
    return torch.sign(z) * torch.clamp(z.abs() - threshold, min=0)


def group_soft_threshold(z: Tensor, threshold: Tensor | float, axis: int) -> Tensor:
    """z_G max(1 - threshold / ||z_G||, 0) for each group G along ``axis``: the prox of threshold
    times the group's Euclidean norm. A group with ||z_G|| <= threshold (zero included) maps to 0
    with derivative 0 (the square root is never evaluated at 0)."""
    squared = (z * z).sum(dim=axis, keepdim=True)
    positive = squared > 0
    norm = torch.where(positive, squared, 1).sqrt()
    scale = torch.clamp(1 - threshold / norm, min=0)
    return z * torch.where(positive, scale, 0)


def _value(upper: Any, strength: Strength) -> Tensor | float:
    return float(strength) if isinstance(strength, (int, float)) else upper[strength]


def strength_names(spec: ProxOperator) -> tuple[tuple[str, str], ...]:
    """(field, upper variable name) for each strength that names an upper variable."""
    fields = {"l1": ("strength",), "elastic_net": ("l1", "l2"), "group_lasso": ("strength",), "custom": ()}[spec.kind]
    return tuple((f, getattr(spec, f)) for f in fields if isinstance(getattr(spec, f), str))


def make_prox(spec: ProxOperator, fn: Callable[..., Tensor] | None = None) -> Prox:
    """The proximal operator a spec declares; ``fn`` is the resolved user function of a custom one
    (its kwargs bound)."""
    if isinstance(spec, L1Prox):
        return lambda upper, z, step: soft_threshold(z, step * _value(upper, spec.strength))
    if isinstance(spec, ElasticNetProx):
        return lambda upper, z, step: soft_threshold(z, step * _value(upper, spec.l1)) / (1 + step * _value(upper, spec.l2))
    if isinstance(spec, GroupLassoProx):
        return lambda upper, z, step: group_soft_threshold(z, step * _value(upper, spec.strength), spec.axis)
    assert isinstance(spec, CustomProx) and fn is not None
    return lambda upper, z, step: fn(upper, z, step)
