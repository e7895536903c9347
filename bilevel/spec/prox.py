"""Non-smooth convex terms of a lower level's objective, given by their proximal operators.

A lower level whose objective is G(x, y) + g(x, y_v) with g convex but not differentiable (an L1
penalty) declares g on the variable y_v as ``prox``; the objective function returns the smooth
part G only. The inner solver is then proximal gradient descent (ISTA; Combettes & Wajs 2005,
"Signal recovery by proximal forward-backward splitting"),

    y_v <- prox_{lr g}(y_v - lr grad_v G),     prox_{s g}(z) = argmin_u g(u) + ||u - z||^2 / (2 s),

and the lower solution is its fixed point (docs/concepts.md#non-smooth-lower-levels). A strength
is a number or the name of a tensor variable of the upper level (a scalar, or a tensor that
broadcasts against the variable: one strength per feature): the HPO of the lasso, with the
regularization strength upstairs (Pedregosa 2016; Bertrand et al. 2020, "Implicit
differentiation of Lasso-type models for hyperparameter optimization")."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from bilevel.spec._base import Reference, SpecModel

__all__ = ["CustomProx", "ElasticNetProx", "GroupLassoProx", "L1Prox", "ProxOperator", "Strength"]

Strength = Union[Annotated[float, Field(ge=0)], Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]]
"""A non-negative number, or the name of a tensor variable of the upper level."""


class L1Prox(SpecModel):
    """g(v) = strength ||v||_1; prox: soft thresholding sign(z) max(|z| - s strength, 0)."""

    kind: Literal["l1"] = "l1"
    """Discriminator: the L1 norm (lasso)."""
    strength: Strength
    """The weight of ||v||_1: a number >= 0, or the name of an upper tensor variable."""


class ElasticNetProx(SpecModel):
    """g(v) = l1 ||v||_1 + l2/2 ||v||^2 (Zou & Hastie 2005); prox: soft(z, s l1) / (1 + s l2)."""

    kind: Literal["elastic_net"] = "elastic_net"
    """Discriminator: the elastic net."""
    l1: Strength
    """The weight of ||v||_1: a number >= 0, or the name of an upper tensor variable."""
    l2: Strength
    """The weight of ||v||^2 / 2: a number >= 0, or the name of an upper tensor variable."""


class GroupLassoProx(SpecModel):
    """g(v) = strength sum_groups ||v_group||_2 (Yuan & Lin 2006); a group is the vector of entries
    along ``axis`` at fixed other indices. prox: z_group max(1 - s strength / ||z_group||, 0)."""

    kind: Literal["group_lasso"] = "group_lasso"
    """Discriminator: the group lasso."""
    strength: Strength
    """The weight of each group's Euclidean norm: a number >= 0, or the name of an upper tensor
    variable (a scalar; or one strength per group, broadcasting against the norms, whose ``axis``
    has size 1)."""
    axis: int = -1
    """The axis a group runs along (for a variable of shape (tasks, features), axis 0 makes each
    feature's column a group: multi-task feature selection)."""


class CustomProx(SpecModel):
    """A user's own proximal operator."""

    kind: Literal["custom"] = "custom"
    """Discriminator: a user's proximal operator."""
    fn: Reference
    """prox(upper, value, step) -> Tensor of value's shape: argmin_u g(u) + ||u - value||^2 / (2 step),
    with ``upper`` the upper level's variables by name (as objectives see them). Written in torch
    operations, so that it is differentiable in value and in the upper variables it reads: the
    implicit and unrolled engines differentiate through it."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments bound to fn."""


def _prox_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("kind")
    return getattr(value, "kind", None)


ProxOperator = Annotated[
    Union[
        Annotated[L1Prox, Tag("l1")],
        Annotated[ElasticNetProx, Tag("elastic_net")],
        Annotated[GroupLassoProx, Tag("group_lasso")],
        Annotated[CustomProx, Tag("custom")],
    ],
    Discriminator(_prox_kind),
]
"""A non-smooth convex term of the objective on one variable, by its proximal operator."""
