"""Objectives of dataset distillation through a trained student (Wang et al. 2018; Blondel et
al. 2022).

Upper variables: ``images`` (n, C, H, W), the synthetic set stored class by class; optionally
``labels`` (n, K), learned soft-label logits; optionally a scalar learned inner learning rate
(declared through the inner solver's ``tuned: {lr: ...}``). Lower variable: the student, a module
variable (any classifier of the images) or tensor variables ``W`` (K, C*H*W) and ``b`` (K) of a
linear softmax model.

    lower  G(X_s, theta) = CE(f_theta(X_s), T_s) + mu/2 ||theta||^2
    upper  F(X_s, theta) = CE(f_theta(X_real), y_real)          on the real training pool

T_s is the class of each synthetic image (hard labels) or softmax(labels) (soft labels). With a
linear student and mu > 0, G is strongly convex in theta: theta*(X_s) is unique and the implicit
engine gives the exact hypergradient (Blondel et al. 2022, "Efficient and Modular Implicit
Differentiation", whose distillation experiment is this one on MNIST). With a network student
the planner unrolls the inner training (Wang et al. 2018, "Dataset Distillation")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from bilevel.spec.errors import VariableError
from problems.common.classifier import check_classifier_input, classifier_logits, classifier_squared_norm

__all__ = ["check_images", "real_loss", "student_logits", "student_loss", "synthetic_targets"]


def student_logits(lower: Any, x: Tensor) -> Tensor:
    """The student's logits: a module variable ``student``, or a linear model ``W``, ``b``."""
    return classifier_logits(lower, x, "student")


def check_images(images: Tensor, real: Tensor) -> None:
    """The synthetic images have the real images' shape (C, H, W) per example."""
    if images.dim() != real.dim() or images.shape[1:] != real.shape[1:]:
        raise VariableError("images", f"has shape {list(images.shape)}, but the real images are {list(real.shape[1:])}:"
                                      f" expected [n, {', '.join(str(s) for s in real.shape[1:])}]")


def synthetic_targets(upper: Any, classes: int) -> Tensor:
    """The synthetic set's targets: class probabilities softmax(labels) when ``labels`` is an
    upper variable, else the class of each row (``ipc`` rows per class, class by class)."""
    n = upper["images"].shape[0]
    if "labels" in upper:
        labels = upper["labels"]
        if list(labels.shape) != [n, classes]:
            raise VariableError("labels", f"has shape {list(labels.shape)}, expected [{n}, {classes}]"
                                          f" (one row of class logits per synthetic image)")
        return torch.softmax(labels, dim=1)
    if n % classes:
        raise VariableError("images", f"holds {n} images, which do not split evenly into {classes} classes:"
                                      f" expected a multiple of {classes} (images per class x classes)")
    return torch.arange(classes, device=upper["images"].device).repeat_interleave(n // classes)


def student_loss(upper: Any, lower: Any, batch: Any, mu: float = 1e-3) -> Tensor:
    """G: the student's cross-entropy on the synthetic set + mu/2 ||theta||^2. Synthetic images the
    student cannot take are a VariableError at ``images`` (the upper objective compares them with
    the real images)."""
    check_classifier_input(lower, upper["images"], "student", variable="images")
    logits = student_logits(lower, upper["images"])
    loss = nnf.cross_entropy(logits, synthetic_targets(upper, logits.shape[1]))
    if mu:
        loss = loss + 0.5 * mu * classifier_squared_norm(lower, "student")
    return loss


def real_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """F: the trained student's cross-entropy on (a batch of) the real training pool. Synthetic
    images unlike the real ones are a VariableError at ``images``; a student that cannot take the
    real images, one at its declared input shape."""
    check_images(upper["images"], batch["x"])
    check_classifier_input(lower, batch["x"], "student", "the real images")
    return nnf.cross_entropy(student_logits(lower, batch["x"]), batch["y"])
