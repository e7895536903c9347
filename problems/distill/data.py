"""Real data and initial values of the synthetic set.

Data sources (``levels.<level>.data.source``) return the real training pool the synthetic set is
distilled from; init functions (``variables.<name>.init`` with ``init_kwargs``) start the
synthetic images from real ones and the labels / targets from their classes. All arguments are
validated (``pydantic.validate_call``), so a bad value is reported at its dotted path in the spec.

The synthetic set is stored class by class: rows ``c * ipc`` to ``(c + 1) * ipc - 1`` belong to
class c (``ipc`` images per class)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import validate_call
from torch import Tensor

from problems.common.data import Split, class_count
from problems.common.images import ImageDataset, Positive, class_balanced_subset, image_split, one_hot

__all__ = ["label_logits", "one_hot_targets", "real_images", "real_split", "real_train", "ssl_targets", "test_split"]


def real_split(dataset: str = "digits", n_train: int = 1000, seed: int = 0, path: str | None = None) -> Split:
    """The real images: the training pool the synthetic set is distilled from (``n_train``
    images of a seeded split) and the rest as test images (no validation part)."""
    return image_split(dataset, n_train, 0, seed, path)


def test_split(dataset: str = "digits", n_train: int = 1000, seed: int = 0, path: str | None = None) -> dict[str, Tensor]:
    """The held-out test images and labels of the same split."""
    return real_split(dataset, n_train, seed, path)["test"]


@validate_call
def real_train(
    dataset: ImageDataset = "digits",
    n_train: Positive = 1000,
    seed: int = 0,
    path: str | None = None,
    targets: Literal["none", "one_hot", "self_supervised"] = "none",
    ssl_steps: Positive = 1000,
) -> dict[str, Tensor]:
    """The real training pool: x (n, C, H, W), y (n,), and with ``targets`` a regression target
    per image: its one-hot label (KIP), or its representation by a self-supervised encoder
    trained on the pool (KRR-ST; see problems.distill.ssl)."""
    pool = dict(real_split(dataset, n_train, seed, path)["train"])
    if targets == "one_hot":
        pool["target"] = one_hot(pool["y"], class_count(pool["y"]))
    elif targets == "self_supervised":
        from problems.distill.ssl import representations

        pool["target"] = representations(pool["x"], dataset=dataset, n_train=n_train, seed=seed, path=path, steps=ssl_steps)
    return pool


def _subset(per_class: int, dataset: str, n_train: int, seed: int, path: str | None, subset_seed: int) -> tuple[Tensor, Tensor]:
    pool = real_split(dataset, n_train, seed, path)["train"]
    index = class_balanced_subset(pool["y"], per_class, class_count(pool["y"]), subset_seed)
    return pool["x"][index], pool["y"][index]


@validate_call
def real_images(
    per_class: Positive = 1,
    dataset: ImageDataset = "digits",
    n_train: Positive = 1000,
    seed: int = 0,
    path: str | None = None,
    subset_seed: int = 0,
) -> Tensor:
    """``per_class`` random real training images of every class, class by class: the usual start
    of a synthetic set (KIP, and most distillation methods after Wang et al. 2018)."""
    return _subset(per_class, dataset, n_train, seed, path, subset_seed)[0].clone()


@validate_call
def label_logits(per_class: Positive = 1, classes: Positive = 10, scale: float = 3.0) -> Tensor:
    """Soft-label logits ``scale * one_hot`` for a class-by-class synthetic set (learned labels,
    Sucholutsky & Schonlau 2021; Bohdal et al. 2020): softmax gives the true class most mass."""
    return scale * one_hot_targets(per_class, classes)


@validate_call
def one_hot_targets(per_class: Positive = 1, classes: Positive = 10) -> Tensor:
    """One-hot regression targets for a class-by-class synthetic set (KIP's labels, learnable)."""
    return one_hot(torch.arange(classes).repeat_interleave(per_class), classes)


@validate_call
def ssl_targets(
    per_class: Positive = 1,
    dataset: ImageDataset = "digits",
    n_train: Positive = 1000,
    seed: int = 0,
    path: str | None = None,
    subset_seed: int = 0,
    ssl_steps: Positive = 1000,
) -> Tensor:
    """The self-supervised representations of the images ``real_images`` starts from (KRR-ST
    initializes the synthetic targets this way)."""
    from problems.distill.ssl import representations

    images, _ = _subset(per_class, dataset, n_train, seed, path, subset_seed)
    return representations(images, dataset=dataset, n_train=n_train, seed=seed, path=path, steps=ssl_steps)
