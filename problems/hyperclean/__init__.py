"""Data hyper-cleaning (Franceschi et al. 2017, "Forward and Reverse Gradient-Based Hyperparameter
Optimization"; Shaban et al. 2019).

Half of the training labels are corrupted. Each training example i gets a weight sigmoid(lam_i);
the lower level trains a classifier on the weighted noisy training set, the upper level asks
that classifier to do well on a small clean validation set:

    w*(lam) = argmin_w  mean_i sigmoid(lam_i) CE(f_w(x_i), y~_i) + mu/2 ||w||^2
    min_lam  CE(f_{w*(lam)}(X_val), y_val)

Examples whose learned weight falls below 1/2 are flagged as corrupted; the report gives test
accuracy and the F1 score of that detection.

Data: the digits set bundled with scikit-learn (1797 8x8 images, features scaled to [0, 1]),
split 600 train / 400 validation / 797 test, or a synthetic Gaussian mixture of any size
(centers 1.5 randn(K, d), x = center + 3 randn(d)) for timing."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from problems.common.data import Split, class_count, digits_images, part_source, shuffled_split

__all__ = [
    "digits_split",
    "lower_objective",
    "mixture_split",
    "mlp",
    "report",
    "test_data",
    "train_data",
    "upper_objective",
    "val_data",
]


def _corrupt(y: Tensor, fraction: float, classes: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Replace the labels of a random `fraction` of examples by a different class."""
    n = y.shape[0]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: int(round(fraction * n))]] = True
    offset = torch.randint(1, classes, (n,), generator=gen)
    noisy = torch.where(flipped, (y + offset) % classes, y)
    return noisy, flipped


@lru_cache(maxsize=8)
def digits_split(n_train: int = 600, n_val: int = 400, noise: float = 0.5, seed: int = 0) -> Split:
    """The scikit-learn digits set (64 features in [0, 1]), shuffled and split; the training
    labels are corrupted, drawn from the same seeded generator as the permutation."""
    images, labels = digits_images()
    gen = torch.Generator().manual_seed(seed)
    split = shuffled_split({"x": images.flatten(1), "y": labels}, n_train, n_val, gen)
    train = split["train"]
    noisy, flipped = _corrupt(train["y"], noise, 10, gen)
    train = {"x": train["x"], "y": noisy, "index": torch.arange(n_train), "corrupted": flipped, "clean_y": train["y"]}
    return {"train": train, "val": split["val"], "test": split["test"]}


@lru_cache(maxsize=8)
def mixture_split(n_train: int = 5000, n_val: int = 5000, d: int = 784, classes: int = 10, noise: float = 0.5, seed: int = 0) -> Split:
    """Synthetic Gaussian mixture with corrupted training labels (the benchmark data)."""
    gen = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(classes, d, generator=gen)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, classes, (n,), generator=gen)
        return centers[y] + 3.0 * torch.randn(n, d, generator=gen), y

    x_tr, y_tr = draw(n_train)
    x_va, y_va = draw(n_val)
    x_te, y_te = draw(n_val)
    noisy, flipped = _corrupt(y_tr, noise, classes, gen)
    return {
        "train": {"x": x_tr, "y": noisy, "index": torch.arange(n_train), "corrupted": flipped, "clean_y": y_tr},
        "val": {"x": x_va, "y": y_va},
        "test": {"x": x_te, "y": y_te},
    }


def _split(dataset: str = "digits", **kwargs: Any) -> Split:
    if dataset == "digits":
        return digits_split(**kwargs)
    if dataset == "mixture":
        return mixture_split(**kwargs)
    raise ValueError(f"unknown dataset {dataset!r}; expected 'digits' or 'mixture'")


def train_data(dataset: str = "digits", **kwargs: Any) -> dict[str, Tensor]:
    """Noisy training split: x, y (noisy), index (for the per-example weights)."""
    train = _split(dataset, **kwargs)["train"]
    return {"x": train["x"], "y": train["y"], "index": train["index"]}


val_data = part_source(_split, "val", "Clean validation split: x, y.")
test_data = part_source(_split, "test", "Clean test split: x, y.")


def mlp(d_in: int = 784, hidden: int = 256, classes: int = 10) -> nn.Module:
    """One tanh hidden layer (the benchmark's M and L models)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def _logits(lower: Any, x: Tensor) -> Tensor:
    if "net" in lower:
        return lower["net"](x)
    # W is stored as nn.Linear stores it, (classes, features): x W^T + b in one kernel, with a
    # markedly cheaper double backward than x @ W + b on a (features, classes) weight
    return nnf.linear(x, lower["W"], lower["b"])


def _squared_norm(lower: Any) -> Tensor:
    if "net" in lower:
        return sum((p**2).sum() for p in lower["net"].params.values())
    return (lower["W"] ** 2).sum() + (lower["b"] ** 2).sum()


def lower_objective(upper: Any, lower: Any, batch: dict[str, Tensor], mu: float = 1e-3) -> Tensor:
    """mean_i sigmoid(lam_i) CE(f_w(x_i), y~_i) + mu/2 ||w||^2 on a training batch."""
    lam, index = upper["lam"], batch["index"]
    # a full batch comes in data order (index = arange): skip the gather and its scatter backward
    weights = torch.sigmoid(lam if index.shape[0] == lam.shape[0] else lam[index])
    losses = nnf.cross_entropy(_logits(lower, batch["x"]), batch["y"], reduction="none")
    return (weights * losses).mean() + 0.5 * mu * _squared_norm(lower)


def upper_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Validation cross-entropy."""
    return nnf.cross_entropy(_logits(lower, batch["x"]), batch["y"])


def _f1(predicted: Tensor, actual: Tensor) -> dict[str, float]:
    tp = (predicted & actual).sum().item()
    precision = tp / max(predicted.sum().item(), 1)
    recall = tp / max(actual.sum().item(), 1)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def _fit_linear(x: Tensor, y: Tensor, weights: Tensor, mu: float, classes: int) -> tuple[Tensor, Tensor]:
    """Weighted multinomial logistic regression solved to convergence with L-BFGS."""
    W = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (weights * nnf.cross_entropy(x @ W + b, y, reduction="none")).mean() + 0.5 * mu * ((W**2).sum() + (b**2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def report(upper: Any, lower: Any, dataset: str = "digits", mu: float = 1e-3, baselines: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Test accuracy, detection of the corrupted labels, and (linear model) reference baselines:
    training on the noisy labels, on the clean validation set only, and on clean training labels."""
    split = _split(dataset, **kwargs)
    train, val, test = split["train"], split["val"], split["test"]
    device = upper["lam"].device
    with torch.no_grad():
        logits = _logits(lower, test["x"].to(device, upper["lam"].dtype))
        accuracy = (logits.argmax(1).cpu() == test["y"]).double().mean().item()
        flagged = (torch.sigmoid(upper["lam"]) < 0.5).cpu()
    out: dict[str, Any] = {"test_accuracy": accuracy, "flagged_corrupted": int(flagged.sum())}
    out.update({f"detection_{k}": v for k, v in _f1(flagged, train["corrupted"]).items()})
    if baselines and "net" not in lower:
        classes = class_count(train["clean_y"], val["y"])

        def accuracy_of(x: Tensor, y: Tensor, w: Tensor) -> float:
            W, b = _fit_linear(x.double(), y, w.double(), mu, classes)
            return ((test["x"].double() @ W + b).argmax(1) == test["y"]).double().mean().item()

        ones = torch.ones(train["y"].shape[0])
        out["baseline_noisy_train_test_accuracy"] = accuracy_of(train["x"], train["y"], ones)
        out["baseline_val_only_test_accuracy"] = accuracy_of(val["x"], val["y"], torch.ones(val["y"].shape[0]))
        out["baseline_clean_train_test_accuracy"] = accuracy_of(train["x"], train["clean_y"], ones)
    return out
