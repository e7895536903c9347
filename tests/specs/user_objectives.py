"""Objectives for the bad-input tests."""

import torch


def data():
    return {"x": torch.randn(20, 4), "t": torch.randn(20)}


def lower(upper, lower, batch):
    return 0.5 * ((batch["x"] @ lower["w"] - batch["t"]) ** 2).mean() + 0.5 * torch.exp(upper["lam"]) * (lower["w"] ** 2).sum()


def upper(upper, lower, batch):
    return 0.5 * ((batch["x"] @ lower["w"] - batch["t"]) ** 2).mean()


def two_args(upper, lower):
    return lower["w"].sum()


def vector_valued(upper, lower, batch):
    return lower["w"] * 2


def not_a_mapping():
    return [1, 2, 3]


def positive_constraint(upper, lower, batch):
    return (lower["w"] ** 2).sum().reshape(1) + 1.0


def sum_constraint(upper, lower, batch):
    return (lower["w"].sum() + upper["lam"]).reshape(1)
