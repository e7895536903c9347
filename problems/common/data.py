"""Data of the problem families: the sets bundled with scikit-learn, seeded train / validation /
test splits, standardization with training statistics, and data sources that return one part of
a split.

Every family splits its data the same way: the N examples (rows) are shuffled by one seeded
permutation, the first ``n_train`` are the training part, the next ``n_val`` the validation part
and the rest the test part. The permutation is ``torch.randperm(N)`` drawn from a
``torch.Generator`` seeded with ``seed``, so a seed names the same split on every machine.
Features are standardized with the training part's statistics only, so nothing of the
validation or test examples leaks into the training data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["Split", "bundled", "class_count", "digits_images", "part_source", "shuffled_split", "standardized"]

Split = dict[str, dict[str, Tensor]]
"""{"train", "val", "test"} -> {name: Tensor}: the parts of a data set, each a mapping of tensors
with the same first dimension (the examples)."""


def bundled(name: Literal["digits", "breast_cancer"]) -> tuple[Tensor, Tensor]:
    """A data set bundled with scikit-learn (nothing is downloaded), as scikit-learn orders it:
    float64 features (N, d) and int64 labels (N,).

    ``digits``: 1797 8x8 images of handwritten digits, flattened to 64 pixel values 0..16, 10
    classes. ``breast_cancer``: 569 tumors, 30 measurements each, 2 classes (1 = benign)."""
    from sklearn import datasets

    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}
    if name not in loaders:
        raise ValueError(f"unknown bundled data set {name!r}; expected one of {', '.join(loaders)}")
    features, labels = loaders[name](return_X_y=True)
    return torch.as_tensor(features, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)


def digits_images() -> tuple[Tensor, Tensor]:
    """The digits as float32 images (1797, 1, 8, 8) with pixel values in [0, 1] (scikit-learn's
    0..16 divided by 16), and their int64 labels."""
    features, labels = bundled("digits")
    return features.float().reshape(-1, 1, 8, 8) / 16.0, labels


def shuffled_split(data: Mapping[str, Tensor], n_train: int, n_val: int, seed: int | torch.Generator) -> Split:
    """Shuffle the examples (the rows of every tensor in ``data``) by one seeded permutation and
    cut them into ``train`` (the first ``n_train``), ``val`` (the next ``n_val``) and ``test`` (the
    rest, at least one example).

    ``seed`` is an int, or a ``torch.Generator`` to draw the permutation from: the caller may go
    on drawing from it (hyper-cleaning corrupts labels with the same generator). The parts are
    views of the shuffled tensors."""
    n = len(next(iter(data.values())))
    if n_train < 1 or n_val < 0 or n_train + n_val >= n:
        raise ValueError(f"n_train={n_train} and n_val={n_val} must leave test examples (the set has {n})")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    shuffled = {name: value[order] for name, value in data.items()}
    cut = n_train + n_val
    parts = {"train": slice(0, n_train), "val": slice(n_train, cut), "test": slice(cut, None)}
    return {part: {name: value[rows] for name, value in shuffled.items()} for part, rows in parts.items()}


def standardized(split: Split, key: str = "x", min_std: float = 0.0, dtype: torch.dtype = torch.float32) -> Split:
    """``split`` with ``split[part][key]`` standardized in every part by the training part's
    per-column mean and sample standard deviation (floored at ``min_std``, for near-constant
    columns), computed in the input's precision and returned as ``dtype``."""
    train = split["train"][key]
    mean, std = train.mean(0), train.std(0).clamp_min(min_std)
    return {part: {**arrays, key: ((arrays[key] - mean) / std).to(dtype)} for part, arrays in split.items()}


def class_count(*labels: Tensor) -> int:
    """The number of classes: one more than the largest of the integer ``labels`` (of one or more
    parts of a split)."""
    return 1 + max(int(y.max()) for y in labels)


def part_source(split: Callable[..., Split], part: str, doc: str | None = None) -> Callable[..., dict[str, Tensor]]:
    """A data source (``levels.<level>.data.source``) named ``<part>_data``: its keyword
    arguments go to ``split``, and it returns ``split(**kwargs)[part]`` as a new dict (of the same
    tensors)."""

    def source(**kwargs: Any) -> dict[str, Tensor]:
        return dict(split(**kwargs)[part])

    source.__name__ = source.__qualname__ = f"{part}_data"
    source.__module__ = split.__module__
    source.__doc__ = doc or f"The {part} part of ``{split.__name__}(**kwargs)``."
    return source
