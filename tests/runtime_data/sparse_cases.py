"""Lower levels with proximal terms beyond the lasso, on problems.sparse_hpo's regression data:
a group lasso over 5 groups of 4 features (w of shape (5, 4), one group per row), a user's own
prox (soft thresholding written out, and the nonnegative lasso's one-sided threshold), and
objectives that break the rules for the error tests."""

from __future__ import annotations

import torch

from problems.sparse_hpo import regression_data


def group_lower(upper, lower, batch):
    residual = batch["X"] @ lower["w"].reshape(-1) - batch["t"]
    return 0.5 * (residual**2).mean()


def group_upper(upper, lower, batch):
    residual = batch["X"] @ lower["w"].reshape(-1) - batch["t"]
    return (residual**2).mean()


def my_soft_threshold(upper, value, step):
    """prox of l1 ||.||_1, written by a user: the same operator as kind: l1."""
    threshold = step * upper["l1"]
    return torch.sign(value) * torch.relu(value.abs() - threshold)


def nonnegative_l1(upper, value, step, scale=1.0):
    """prox of scale l1 ||.||_1 + the indicator of value >= 0: max(value - step scale l1, 0)."""
    return torch.relu(value - step * scale * upper["l1"])


def train(split="train"):
    return regression_data(split)
