"""Training, validation and test data of the poisoning problems.

``train`` returns the victim's training set with the attacker's budget attached per example:
``epsilon`` is the L-infinity bound of example i (the budget's epsilon on the poisoned fraction,
0 elsewhere), so the objectives apply a perturbation z_i in [-1, 1] as

    x~_i = clip(x_i + epsilon_i z_i, 0, 1),        |x~_i - x_i| <= epsilon_i elementwise,

which can never exceed the budget: examples outside the poisoned fraction have epsilon_i = 0 and
stay exactly as they are. For a backdoor the poisoned examples (drawn from classes other than
the target) are relabeled to the target class, and the trigger is one z shared by all of them.
For a contrastive backdoor (Sun et al. 2024, a victim trained without labels) the poisoned
examples are images of the target class carrying the trigger, as in backdoor attacks on
self-supervised learning, and no label changes: the victim learns to embed the trigger near the
target class's features. All arguments are validated (:class:`PoisonData`): a bad budget is a
spec error at its dotted path, and so are images whose pixel values leave [0, 1] (the units of the
budget's epsilon and of the clipping)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from torch import Tensor

from problems.common.data import Split
from problems.common.images import ImageDataset, Positive, image_split
from problems.poison.budget import PoisonBudget

__all__ = ["PoisonData", "poisoned_index", "test_data", "train", "training_set", "val", "zero_perturbation"]

Attack = Literal["availability", "backdoor", "contrastive_backdoor"]


class PoisonData(BaseModel):
    """The keyword arguments of every data source and init function of the poisoning problems
    (``train``, ``val``, ``zero_perturbation``; ``data.kwargs`` and ``init_kwargs`` in a spec,
    declared once with a YAML anchor). A bad value is a spec error at its dotted path."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    budget: PoisonBudget
    """What the attacker may change: the fraction of the training set and epsilon per pixel."""
    attack: Attack = "availability"
    """availability (perturb training images so that the victim does worse on clean data),
    backdoor (a trigger that sends any input to ``target``; poisoned images of other classes are
    relabeled to it) or contrastive_backdoor (the same goal against a victim trained without
    labels: poisoned images of the target class carry the trigger, no label changes)."""
    target: Annotated[int, Field(ge=0)] = 0
    """The backdoor's target class."""
    dataset: ImageDataset = "digits"
    """The images: the bundled digits, or a local .npz file (``path``)."""
    n_train: Positive = 600
    """Training images (the victim's training set); the next ``n_val`` are the attacker's clean
    validation images, the rest the test images."""
    n_val: Positive = 400
    """Clean validation images."""
    seed: int = 0
    """Seed of the split and of the choice of the poisoned examples."""
    path: str | None = None
    """The .npz file of ``dataset: npz`` (arrays x and y)."""

    def split(self) -> Split:
        """The images split train / val / test (``problems.common.images.image_split``), checked
        to have pixel values in [0, 1]; otherwise a validation error at ``path`` (``dataset`` for
        the bundled digits), which a spec reports at that argument's dotted path."""
        split = image_split(self.dataset, self.n_train, self.n_val, self.seed, self.path)
        low = min(float(part["x"].min()) for part in split.values())
        high = max(float(part["x"].max()) for part in split.values())
        if low < 0.0 or high > 1.0:
            field = "path" if self.dataset == "npz" else "dataset"
            message = (f"the images' pixel values span [{low:g}, {high:g}]; expected values in [0, 1], the units of the"
                       " budget's epsilon and of the clipping of poisoned images (store uint8 images, or divide by 255)")
            error = InitErrorDetails(type=PydanticCustomError("pixel_range", message), loc=(field,), input=getattr(self, field))
            raise ValidationError.from_exception_data(type(self).__name__, [error])
        return split


def poisoned_index(y: Tensor, budget: PoisonBudget, attack: str, target: int, seed: int) -> Tensor:
    """The training examples the attacker modifies: round(fraction * n) of them drawn at random
    (for a backdoor, among the examples whose class is not the target; for a contrastive backdoor,
    among those of the target class)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    if attack == "availability":
        candidates = torch.arange(len(y))
    elif attack == "contrastive_backdoor":
        candidates = torch.nonzero(y == target).flatten()
    else:
        candidates = torch.nonzero(y != target).flatten()
    count = budget.count(len(y))
    if count > len(candidates):
        which = {"availability": "", "backdoor": " (images of other classes than the target)",
                 "contrastive_backdoor": " (images of the target class)"}[attack]
        message = (f"the budget poisons round(fraction n) = {count} examples but only {len(candidates)} are eligible{which}:"
                   f" lower the fraction to at most {len(candidates) / len(y):.3f}")
        error = InitErrorDetails(type=PydanticCustomError("budget_too_large", message), loc=("budget", "fraction"),
                                 input=budget.fraction)
        raise ValidationError.from_exception_data("PoisonData", [error])
    return candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values


def train(**kwargs: Any) -> dict[str, Tensor]:
    """The victim's training set: x (clean images), y (labels; relabeled to ``target`` on the
    poisoned examples of a backdoor), epsilon (per-example L-infinity budget), poisoned (mask).
    Keyword arguments: the fields of :class:`PoisonData`."""
    data = PoisonData.model_validate(kwargs)
    return training_set(data, data.split())


def training_set(data: PoisonData, split: Split) -> dict[str, Tensor]:
    """:func:`train` from validated arguments and their split (``data.split()``), for a caller
    that needs the split's other parts as well; the split's own labels are left clean."""
    part = split["train"]
    x, y = part["x"], part["y"].clone()
    index = poisoned_index(y, data.budget, data.attack, data.target, data.seed)
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[index] = True
    if data.attack == "backdoor":
        y[index] = data.target
    epsilon = torch.where(poisoned, data.budget.epsilon, 0.0).to(torch.float32)
    return {"x": x, "y": y, "epsilon": epsilon, "poisoned": poisoned}


def val(**kwargs: Any) -> dict[str, Tensor]:
    """The attacker's clean validation set: x, y, and epsilon (the budget's epsilon, which a
    backdoor's trigger has at test time). For a backdoor only examples outside the target class;
    for a contrastive backdoor all of them (those of the target class are the references whose
    features the triggered others should take). Keyword arguments: the fields of :class:`PoisonData`."""
    data = PoisonData.model_validate(kwargs)
    part = data.split()["val"]
    x, y = part["x"], part["y"]
    if data.attack == "backdoor":
        keep = y != data.target
        x, y = x[keep], y[keep]
    return {"x": x, "y": y, "epsilon": torch.full((len(y),), data.budget.epsilon)}


def test_data(dataset: str = "digits", n_train: int = 600, n_val: int = 400, seed: int = 0, path: str | None = None, **_: object) -> dict[str, Tensor]:
    """The held-out clean test split (the other fields of :class:`PoisonData` are ignored)."""
    return image_split(dataset, n_train, n_val, seed, path)["test"]


def zero_perturbation(**kwargs: Any) -> Tensor:
    """Zeros of the shape the attack's upper variable must have: one perturbation per training
    example (availability; only the poisoned ones can move) or one trigger (1, C, H, W).
    Keyword arguments: the fields of :class:`PoisonData`."""
    data = PoisonData.model_validate(kwargs)
    x = data.split()["train"]["x"]
    return torch.zeros((x.shape[0] if data.attack == "availability" else 1, *x.shape[1:]))
