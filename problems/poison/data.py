"""Training, validation and test data of the poisoning problems.

``train`` returns the victim's training set with the attacker's budget attached per example:
``epsilon`` is the L-infinity bound of example i (the budget's epsilon on the poisoned fraction,
0 elsewhere), so the objectives apply a perturbation z_i in [-1, 1] as

    x~_i = clip(x_i + epsilon_i z_i, 0, 1),        |x~_i - x_i| <= epsilon_i elementwise,

which can never exceed the budget: examples outside the poisoned fraction have epsilon_i = 0 and
stay exactly as they are. For a backdoor the poisoned examples (drawn from classes other than
the target) are relabeled to the target class, and the trigger is one z shared by all of them.
All arguments are validated (``pydantic.validate_call``): a bad budget is a spec error at its
dotted path."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, validate_call
from torch import Tensor

from problems.common.images import image_split
from problems.poison.budget import PoisonBudget

__all__ = ["poisoned_index", "test_data", "train", "val", "zero_perturbation"]

Positive = Annotated[int, Field(ge=1)]
Attack = Literal["availability", "backdoor"]


def _split(dataset: str, n_train: int, n_val: int, seed: int, path: str | None) -> dict[str, dict[str, Tensor]]:
    return image_split(dataset, n_train, n_val, seed, path)


def poisoned_index(y: Tensor, budget: PoisonBudget, attack: str, target: int, seed: int) -> Tensor:
    """The training examples the attacker modifies: round(fraction * n) of them drawn at random
    (for a backdoor, among the examples whose class is not the target)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    candidates = torch.arange(len(y)) if attack == "availability" else torch.nonzero(y != target).flatten()
    count = budget.count(len(y))
    if count > len(candidates):
        raise ValueError(f"the budget poisons {count} examples but only {len(candidates)} are eligible")
    return candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values


@validate_call
def train(
    budget: PoisonBudget,
    attack: Attack = "availability",
    target: Annotated[int, Field(ge=0)] = 0,
    dataset: Literal["digits", "npz"] = "digits",
    n_train: Positive = 600,
    n_val: Positive = 400,
    seed: int = 0,
    path: str | None = None,
) -> dict[str, Tensor]:
    """The victim's training set: x (clean images), y (labels; relabeled to ``target`` on the
    poisoned examples of a backdoor), epsilon (per-example L-infinity budget), poisoned (mask)."""
    data = _split(dataset, n_train, n_val, seed, path)["train"]
    x, y = data["x"], data["y"].clone()
    index = poisoned_index(y, budget, attack, target, seed)
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[index] = True
    if attack == "backdoor":
        y[index] = target
    epsilon = torch.where(poisoned, budget.epsilon, 0.0).to(torch.float32)
    return {"x": x, "y": y, "epsilon": epsilon, "poisoned": poisoned}


@validate_call
def val(
    budget: PoisonBudget,
    attack: Attack = "availability",
    target: Annotated[int, Field(ge=0)] = 0,
    dataset: Literal["digits", "npz"] = "digits",
    n_train: Positive = 600,
    n_val: Positive = 400,
    seed: int = 0,
    path: str | None = None,
) -> dict[str, Tensor]:
    """The attacker's clean validation set: x, y, and epsilon (the budget's epsilon, which a
    backdoor's trigger has at test time). For a backdoor only examples outside the target class."""
    data = _split(dataset, n_train, n_val, seed, path)["val"]
    x, y = data["x"], data["y"]
    if attack == "backdoor":
        keep = y != target
        x, y = x[keep], y[keep]
    return {"x": x, "y": y, "epsilon": torch.full((len(y),), budget.epsilon)}


def test_data(dataset: str = "digits", n_train: int = 600, n_val: int = 400, seed: int = 0, path: str | None = None, **_: object) -> dict[str, Tensor]:
    """The held-out clean test split."""
    return _split(dataset, n_train, n_val, seed, path)["test"]


@validate_call
def zero_perturbation(
    budget: PoisonBudget,
    attack: Attack = "availability",
    target: Annotated[int, Field(ge=0)] = 0,
    dataset: Literal["digits", "npz"] = "digits",
    n_train: Positive = 600,
    n_val: Positive = 400,
    seed: int = 0,
    path: str | None = None,
) -> Tensor:
    """Zeros of the shape the attack's upper variable must have: one perturbation per training
    example (availability; only the poisoned ones can move) or one trigger (1, C, H, W)."""
    x = _split(dataset, n_train, n_val, seed, path)["train"]["x"]
    return torch.zeros((x.shape[0] if attack == "availability" else 1, *x.shape[1:]))
