"""Image data sets as (N, C, H, W) float tensors in [0, 1] with integer labels, split into
train / validation / test by a seeded permutation (``problems.common.data.shuffled_split``).

``digits`` is the 8x8 digits set bundled with scikit-learn (1797 images, 10 classes, pixel values
0..16 scaled to [0, 1]): nothing is downloaded. ``npz`` reads a local file with arrays ``x``
((N, H, W) or (N, C, H, W); uint8 values are divided by 255) and ``y`` (N integer labels), so
users who have MNIST, FashionMNIST or CIFAR-10 on disk run the same problems on them."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from problems.common.data import Split, digits_images, shuffled_split

__all__ = ["ImageDataset", "Positive", "class_balanced_subset", "image_split", "one_hot"]

ImageDataset = Literal["digits", "npz"]
"""The data sets ``image_split`` reads: the bundled digits, or a local .npz file."""
Positive = Annotated[int, Field(ge=1)]
"""A count of at least 1, for validated arguments (``pydantic.validate_call``, models)."""


def _load(dataset: str, path: str | None) -> tuple[Tensor, Tensor]:
    if dataset == "digits":
        return digits_images()
    if dataset == "npz":
        if path is None:
            raise ValueError("dataset 'npz' needs path: a .npz file with arrays x and y")
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"dataset file {str(file)!r} not found")
        with np.load(file) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise ValueError(f"{file} must hold arrays named x and y (found {', '.join(arrays.files)})")
            raw, labels = arrays["x"], arrays["y"]
        x = torch.as_tensor(raw)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise ValueError(f"{file}: x has shape {list(raw.shape)}, expected (N, H, W) or (N, C, H, W)")
        y = torch.as_tensor(labels).long().reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{file}: {x.shape[0]} images but {y.shape[0]} labels")
        return x, y
    raise ValueError(f"unknown dataset {dataset!r}; expected 'digits' or 'npz'")


@lru_cache(maxsize=16)
def image_split(dataset: str = "digits", n_train: int = 1000, n_val: int = 0, seed: int = 0, path: str | None = None) -> Split:
    """{"train", "val", "test"} -> {"x": (n, C, H, W), "y": (n,)}; the test split is the rest."""
    x, y = _load(dataset, path)
    return shuffled_split({"x": x, "y": y}, n_train, n_val, seed)


def class_balanced_subset(y: Tensor, per_class: int, classes: int, seed: int) -> Tensor:
    """Indices of ``per_class`` random examples of each class 0..classes-1, ordered by class."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(classes):
        members = torch.nonzero(y == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} examples; {per_class} per class requested")
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks)


def one_hot(y: Tensor, classes: int) -> Tensor:
    """(n,) labels -> (n, classes) float one-hot rows."""
    return torch.nn.functional.one_hot(y, classes).float()
