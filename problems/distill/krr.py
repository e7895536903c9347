"""Kernel ridge regression distillation (KIP: Nguyen, Chen, Lee, "Dataset Meta-Learning from
Kernel Ridge-Regression", ICLR 2021; KRR-ST: Lee et al., "Self-Supervised Dataset Distillation
for Transfer Learning", ICLR 2024).

A kernel regressor fitted on the synthetic set (X_s, Y_s) predicts the real data:

    lower  alpha*(X_s, Y_s) = argmin_alpha  1/2 <alpha, (K_ss + lam I) alpha> - <alpha, Y_s>
                            = (K_ss + lam I)^{-1} Y_s                     (closed form)
    upper  F = 1/(2 n_t) ||K_ts alpha* - Y_t||^2                           on real (X_t, Y_t)

K_ab = k(X_a, X_b); lam = reg * tr(K_ss) / n_s (KIP's scale-free regularization). Y_t are the real
images' one-hot labels (KIP) or their representations by a self-supervised teacher (KRR-ST);
Y_s are the one-hot classes of the synthetic rows or an upper variable ``targets`` (learned
labels / learned target representations).

Why a lower level at all, when alpha* has a closed form: the lower objective is a strongly convex
quadratic with Hessian (K_ss + lam I) (x) I, so the framework's closed-form lower solution
(``solution: problems.distill:krr_solution``) plus the implicit engine with a direct solve gives
the exact hypergradient, dF/dX_s = d_X F - (d^2_{X alpha} G)^T (K_ss + lam I)^{-1} d_alpha F, through
the same HVP and linear-solver code as every other problem. It equals autograd through
torch.linalg.solve (tests/test_distill.py checks it in float64).

Kernels (on flattened images): ``nngp``, the arc-cosine kernel of an infinitely wide one-hidden-
layer ReLU network (Cho & Saul 2009; the NNGP of a fully connected net, as KIP uses),
k(a, b) = s_w / (2 pi) |a||b| (sin t + (pi - t) cos t) + s_b with t the angle between the inputs
augmented by a bias coordinate; and ``rbf``, exp(-gamma ||a - b||^2 / d)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from bilevel.spec.errors import VariableError
from problems.distill.objectives import check_images

__all__ = ["kernel", "krr_lower", "krr_predict", "krr_real_loss", "krr_solution", "synthetic_regression_targets"]

KernelName = Literal["nngp", "rbf"]


def kernel(a: Tensor, b: Tensor, name: KernelName = "nngp", gamma: float = 1.0) -> Tensor:
    """The (n_a, n_b) kernel matrix between flattened images."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if name == "rbf":
        squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return torch.exp(-gamma * squared.clamp_min(0) / a.shape[1])
    if name != "nngp":
        raise ValueError(f"unknown kernel {name!r}; expected 'nngp' or 'rbf'")
    d = a.shape[1]
    # first layer: weights N(0, 1/d), bias N(0, 1): k0(a, b) = <a, b>/d + 1
    k0 = a @ b.T / d + 1.0
    na = torch.sqrt((a * a).sum(1) / d + 1.0)
    nb = torch.sqrt((b * b).sum(1) / d + 1.0)
    cos = (k0 / (na[:, None] * nb[None, :])).clamp(-1 + 1e-6, 1 - 1e-6)
    theta = torch.arccos(cos)
    relu = na[:, None] * nb[None, :] * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)
    return 2.0 * relu + 0.1  # readout weights N(0, 2), bias N(0, 0.1)


def synthetic_regression_targets(upper: Any, width: int) -> Tensor:
    """Y_s: the upper variable ``targets`` when declared, else the one-hot class of each row."""
    n = upper["images"].shape[0]
    if "targets" in upper:
        targets = upper["targets"]
        if list(targets.shape) != [n, width]:
            raise VariableError("targets", f"has shape {list(targets.shape)}, expected [{n}, {width}]"
                                           " (one target row per synthetic image, as wide as the lower coefficients)")
        return targets
    if n % width:
        raise VariableError("images", f"holds {n} images, which do not split evenly into {width} classes:"
                                      f" expected a multiple of {width}")
    eye = torch.eye(width, dtype=upper["images"].dtype, device=upper["images"].device)
    return eye.repeat_interleave(n // width, dim=0)


def _regularized_gram(images: Tensor, name: KernelName, gamma: float, reg: float) -> Tensor:
    gram = kernel(images, images, name, gamma)
    n = gram.shape[0]
    lam = reg * torch.diagonal(gram).sum() / n
    return gram + lam * torch.eye(n, dtype=gram.dtype, device=gram.device)


def _alpha(lower: Any, n: int) -> Tensor:
    alpha = lower["alpha"]
    if alpha.dim() != 2 or alpha.shape[0] != n:
        raise VariableError("alpha", f"has shape {list(alpha.shape)}, expected [{n}, k]: one row of coefficients per"
                                     " synthetic image, k = classes (or the target representation's width)")
    return alpha


def krr_lower(upper: Any, lower: Any, batch: Any, kernel_name: KernelName = "nngp", gamma: float = 1.0, reg: float = 1e-3) -> Tensor:
    """G(X_s, alpha) = 1/2 <alpha, (K_ss + lam I) alpha> - <alpha, Y_s>."""
    images = upper["images"]
    alpha = _alpha(lower, images.shape[0])
    gram = _regularized_gram(images, kernel_name, gamma, reg)
    targets = synthetic_regression_targets(upper, alpha.shape[1])
    return 0.5 * (alpha * (gram @ alpha)).sum() - (alpha * targets).sum()


def krr_solution(upper: Any, lower: Any, batch: Any, kernel_name: KernelName = "nngp", gamma: float = 1.0, reg: float = 1e-3) -> dict[str, Tensor]:
    """alpha* = (K_ss + lam I)^{-1} Y_s (Cholesky: the matrix is symmetric positive definite)."""
    images = upper["images"]
    alpha = _alpha(lower, images.shape[0])
    gram = _regularized_gram(images, kernel_name, gamma, reg)
    targets = synthetic_regression_targets(upper, alpha.shape[1])
    return {"alpha": torch.cholesky_solve(targets, torch.linalg.cholesky(gram))}


def krr_predict(images: Tensor, alpha: Tensor, x: Tensor, kernel_name: KernelName = "nngp", gamma: float = 1.0) -> Tensor:
    """The kernel regressor's outputs on x: K(x, X_s) alpha."""
    return kernel(x, images, kernel_name, gamma) @ alpha


def krr_real_loss(upper: Any, lower: Any, batch: dict[str, Tensor], kernel_name: KernelName = "nngp", gamma: float = 1.0) -> Tensor:
    """F = 1/(2 n_t) ||K_ts alpha - Y_t||^2 on a batch of real images and their targets."""
    images = upper["images"]
    check_images(images, batch["x"])
    alpha = _alpha(lower, images.shape[0])
    if batch["target"].shape[1] != alpha.shape[1]:
        raise VariableError("alpha", f"has {alpha.shape[1]} columns, but the real targets have {batch['target'].shape[1]}:"
                                     f" expected shape [{images.shape[0]}, {batch['target'].shape[1]}]")
    residual = krr_predict(images, alpha, batch["x"], kernel_name, gamma) - batch["target"]
    return 0.5 * (residual * residual).sum(1).mean()
