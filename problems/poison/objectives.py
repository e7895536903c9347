"""Objectives of the poisoning problems. Lower: the victim trains on the poisoned training set.
Upper: the attacker's goal for the trained victim.

Upper variables (all in [-1, 1], scaled by the per-example budget epsilon_i of the data; declare
them with ``set: {low: -1, high: 1}`` so that the outer optimizer's iterate is projected there,
and the objectives clip them as well):

* ``delta`` (n_train, C, H, W): one perturbation per training example (availability poisoning;
  only the poisoned fraction has epsilon_i > 0, the other rows never change anything);
* ``trigger`` (1, C, H, W): one additive pattern (backdoor), applied to the poisoned examples
  during training and to any input at test time.

    lower  G(z, theta) = CE(f_theta(clip(X + eps z, 0, 1)), y) + mu/2 ||theta||^2
    upper  availability:  F = -CE(f_theta*(X_val), y_val)                (maximize the victim's loss)
           backdoor:      F = CE(f_theta*(clip(X_val + eps z, 0, 1)), target)   (non-target X_val)

Contrastive backdoor (Sun et al. 2024, "Backdoor Contrastive Learning via Bi-level Trigger
Optimization", BLTO): the victim is an encoder f trained by SimCLR on the poisoned images without
labels, and the trigger should bring triggered images of any class close to the target class in
f's embedding, throughout the victim's training:

    lower  G(z, theta) = InfoNCE(g(f_theta(t1(x~))), g(f_theta(t2(x~)))),   x~ = clip(X + eps z, 0, 1)
    upper  F = -mean_{i, r} cos(f_theta*(t1(clip(x_i + eps z, 0, 1))), f_theta*(t2(x_r)))

t1, t2 random augmentations (``problems.poison.contrastive``), x_i validation images of other
classes, x_r validation images of the target class (the attacker's references).

With a linear victim and mu > 0 the lower level is strongly convex and the implicit engine gives
the exact hypergradient (Munoz-Gonzalez et al. 2017 back-gradient poisoning differentiates the
unrolled training instead; ``--engine unrolled`` does that, as MetaPoison, Huang et al. 2020,
does over a few steps of a network's training)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from bilevel.spec.errors import VariableError
from problems.common.classifier import check_classifier_input, classifier_logits, classifier_squared_norm
from problems.poison.contrastive import augment, info_nce

__all__ = [
    "apply_perturbation",
    "availability_loss",
    "backdoor_loss",
    "contrastive_backdoor_loss",
    "contrastive_victim_loss",
    "perturbation",
    "victim_logits",
    "victim_loss",
]


def victim_logits(lower: Any, x: Tensor) -> Tensor:
    """The victim's logits: a module variable ``victim``, or a linear model ``W``, ``b``. Images
    the victim was not built for are a VariableError at its declared input shape."""
    check_classifier_input(lower, x, "victim", "the data's images")
    return classifier_logits(lower, x, "victim")


def perturbation(upper: Any, x: Tensor) -> Tensor:
    """The attacker's variable in [-1, 1], checked against the images x (n, C, H, W): ``delta``
    needs one row per training example, ``trigger`` one (1, C, H, W) pattern."""
    if "delta" in upper:
        name, z = "delta", upper["delta"]
        expected = [x.shape[0], *x.shape[1:]]
    elif "trigger" in upper:
        name, z = "trigger", upper["trigger"]
        expected = [1, *x.shape[1:]]
    else:
        raise ValueError("the attacker needs an upper variable named delta (availability) or trigger (backdoor)")
    if list(z.shape) != expected:
        what = (f"one perturbation per training example; there are {x.shape[0]} training images" if name == "delta"
                else "one pattern")
        raise VariableError(name, f"has shape {list(z.shape)}, but the images are {list(x.shape[1:])}: expected {expected} ({what})")
    return z.clamp(-1.0, 1.0)


def apply_perturbation(x: Tensor, z: Tensor, epsilon: Tensor) -> Tensor:
    """clip(x + epsilon_i z_i, 0, 1): never more than epsilon_i from x_i, never outside [0, 1]."""
    return (x + epsilon.reshape(-1, *([1] * (x.dim() - 1))) * z).clamp(0.0, 1.0)


def victim_loss(upper: Any, lower: Any, batch: dict[str, Tensor], mu: float = 1e-2) -> Tensor:
    """G: the victim's cross-entropy on the poisoned training set + mu/2 ||theta||^2."""
    x = batch["x"]
    poisoned = apply_perturbation(x, perturbation(upper, x), batch["epsilon"])
    loss = nnf.cross_entropy(victim_logits(lower, poisoned), batch["y"])
    if mu:
        loss = loss + 0.5 * mu * classifier_squared_norm(lower, "victim")
    return loss


def availability_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """F = -CE on clean validation data: minimizing it maximizes the trained victim's error."""
    return -nnf.cross_entropy(victim_logits(lower, batch["x"]), batch["y"])


def backdoor_loss(upper: Any, lower: Any, batch: dict[str, Tensor], target: int = 0) -> Tensor:
    """F = CE(victim(clip(x + eps z)), target) on validation images of other classes: the
    trained victim should send any triggered input to the target class."""
    x = batch["x"]
    triggered = apply_perturbation(x, perturbation(upper, x), batch["epsilon"])
    labels = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    return nnf.cross_entropy(victim_logits(lower, triggered), labels)


def contrastive_victim_loss(upper: Any, lower: Any, batch: dict[str, Tensor], temperature: float = 0.5,
                            encoder: str = "encoder") -> Tensor:
    """G: SimCLR's InfoNCE of the encoder ``lower[encoder]`` on two random views of each poisoned
    training image (no labels; the trigger is applied before the augmentations)."""
    x = batch["x"]
    poisoned = apply_perturbation(x, perturbation(upper, x), batch["epsilon"])
    f = lower[encoder]
    return info_nce(f(augment(poisoned), project=True), f(augment(poisoned), project=True), temperature)


def contrastive_backdoor_loss(upper: Any, lower: Any, batch: dict[str, Tensor], target: int = 0,
                              encoder: str = "encoder") -> Tensor:
    """F (BLTO): minus the mean cosine similarity between the features of augmented triggered
    validation images of other classes and of augmented validation images of the target class."""
    x, y = batch["x"], batch["y"]
    others, references = x[y != target], x[y == target]
    if others.shape[0] == 0 or references.shape[0] == 0:
        raise ValueError(f"the validation batch needs images of the target class {target} and of other classes"
                         " (give the upper level's data batch_size: null, or a larger batch)")
    triggered = apply_perturbation(others, perturbation(upper, others), batch["epsilon"][y != target])
    f = lower[encoder]
    u = nnf.normalize(f(augment(triggered)), dim=1)
    v = nnf.normalize(f(augment(references)), dim=1)
    return -(u @ v.T).mean()
