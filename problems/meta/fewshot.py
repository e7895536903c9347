"""N-way K-shot classification on the digits bundled with scikit-learn (8x8 images, 10 classes).

As for Omniglot (Santoro et al. 2016; Finn et al. 2017), rotations by 0, 90, 180 and 270 degrees
make new classes: 40 classes of about 180 images, split into meta-train classes (the digits 0-4 in
their four rotations, 20 classes) and meta-test classes (the digits 5-9, 20 classes), so that
meta-test tasks hold digits never seen in training. A task draws N classes of its split, labels
them 0..N-1 in a random order (``permute``), and K support and ``query`` query images per class,
without replacement. The model is an MLP on the 64 pixels
(scaled to [0, 1]) with a softmax over the N ways; the task loss is the cross-entropy, the
metric the query accuracy.

The "pretrained, then fine-tuned" baseline uses the same machinery: zero adaptation steps during
training on tasks whose labels are the classes themselves (``permute: false``), which is ordinary
supervised training on all meta-train classes (MAML with k = 0 reduces to it), and fine-tuning on
each meta-test task's support set at meta-test."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLASSES", "accuracy", "anil_query_loss", "anil_support_loss", "body", "digits_tasks", "head", "mlp",
           "query_loss", "support_loss"]

CLASSES = {"train": tuple((digit, k) for digit in range(5) for k in range(4)),
           "test": tuple((digit, k) for digit in range(5, 10) for k in range(4))}
"""(digit, quarter turns) of each split's classes."""


@lru_cache(maxsize=1)
def _classes() -> dict[tuple[int, int], Tensor]:
    """(digit, quarter turns) -> its images, flattened to 64 pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 8, 8) / 16.0
    labels = torch.as_tensor(y)
    return {(digit, k): torch.rot90(images[labels == digit], k, dims=(1, 2)).reshape(-1, 64)
            for digit in range(10) for k in range(4)}


def digits_tasks(count: int, generator: torch.Generator, ways: int = 5, shots: int = 1, query: int = 15,
                 split: str = "train", permute: bool = True) -> dict[str, dict[str, Tensor]]:
    """``count`` N-way K-shot tasks of the split's classes: x (count, ways * n, 64), y (count, ways * n)."""
    if split not in CLASSES:
        raise ValueError(f"split must be one of {sorted(CLASSES)}, got {split!r}")
    pool = CLASSES[split]
    if not 1 <= ways <= len(pool):
        raise ValueError(f"ways must be between 1 and {len(pool)} (the {split} split has {len(pool)} classes), got {ways}")
    images = _classes()
    parts: dict[str, dict[str, list[Tensor]]] = {"support": {"x": [], "y": []}, "query": {"x": [], "y": []}}
    for _ in range(count):
        chosen = torch.randperm(len(pool), generator=generator)[:ways] if permute else torch.arange(ways)
        for part in parts.values():
            part["x"].append([])
            part["y"].append([])
        for label, index in enumerate(chosen.tolist()):
            members = images[pool[index]]
            picks = members[torch.randperm(len(members), generator=generator)[: shots + query]]
            for part, rows in (("support", picks[:shots]), ("query", picks[shots:])):
                parts[part]["x"][-1].append(rows)
                parts[part]["y"][-1].append(torch.full((len(rows),), label, dtype=torch.long))
    return {part: {"x": torch.stack([torch.cat(t) for t in sets["x"]]), "y": torch.stack([torch.cat(t) for t in sets["y"]])}
            for part, sets in parts.items()}


def mlp(ways: int = 5, hidden: int = 64) -> nn.Module:
    """64 pixels -> two hidden layers of ``hidden`` ReLU units -> ``ways`` logits."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, ways))


def body(hidden: int = 64) -> nn.Module:
    """ANIL's shared feature extractor: the MLP without its last layer."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


def head(ways: int = 5, hidden: int = 64) -> nn.Module:
    return nn.Linear(hidden, ways)


def support_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(lower["phi"](batch["x"]), batch["y"])


def query_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(lower["phi"](batch["x"]), batch["y"])


def anil_support_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(lower["head"](upper["body"](batch["x"])), batch["y"])


def anil_query_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(lower["head"](upper["body"](batch["x"])), batch["y"])


def accuracy(upper: Any, lower: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The query accuracy of the adapted model (the task's metric at meta-test)."""
    logits = lower["head"](upper["body"](batch["x"])) if "head" in lower else lower["phi"](batch["x"])
    return {"accuracy": (logits.argmax(-1) == batch["y"]).double().mean()}
