"""Hyperparameter optimization on top of per-example data reweighting: a three-level problem.

Half of the training labels are corrupted (the data hyper-cleaning setting of Franceschi et al.
2017). The model is a linear softmax classifier. Three levels, each with its own data:

    bottom  (W, b):  min  mean_i sigmoid(lam_i) CE(W x_i + b, y~_i) + exp(s)/2 (||W||^2 + ||b||^2)   noisy training set
    middle  lam:     min  CE(W*(lam, s) X_1 + b*, y_1)                                                clean split 1
    top     s:       min  CE(W*(lam*(s), s) X_2 + b*, y_2)                                            clean split 2

The middle level learns one weight per training example against the first clean split, given the
L2 strength exp(s); the top level tunes the strength against the second clean split, through the
reweighting it induces. Multilevel formulations of this kind (a hyperparameter above a data
reweighting) are the motivating examples of Sato, Tanaka & Takeda 2021 ("A Gradient Method for
Multilevel Optimization", NeurIPS) and Betty (Choe et al. 2023, ICLR).

The same functions serve the two-level baselines of ``compare.py``: the strength ``s`` and the
weights ``lam`` are read from the variables when a level declares them, otherwise the strength is
the ``log_l2`` keyword and every example has weight 1.

Data: the digits set bundled with scikit-learn, split as for hyper-cleaning
(problems/hyperclean: 600 training examples with half of the labels flipped, 400 clean
validation examples, 797 test examples); the validation examples are cut into two halves,
``split=1`` (the middle level's) and ``split=2`` (the top level's)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from problems import hyperclean
from problems.common.data import part_source

__all__ = ["model_objective", "report", "test_data", "train_data", "val_data", "validation_loss"]


def train_data(**kwargs: Any) -> dict[str, Tensor]:
    """The noisy training set: x, y (half of the labels corrupted), index (for the per-example weights)."""
    return hyperclean.train_data("digits", **kwargs)


def val_data(split: int | None = None, **kwargs: Any) -> dict[str, Tensor]:
    """Clean validation examples: the first half (split=1), the second half (split=2) or all (None)."""
    val = hyperclean.digits_split(**kwargs)["val"]
    if split is None:
        return dict(val)
    if split not in (1, 2):
        raise ValueError(f"split must be 1, 2 or None, got {split!r}")
    half = val["y"].shape[0] // 2
    part = slice(0, half) if split == 1 else slice(half, None)
    return {k: v[part] for k, v in val.items()}


test_data = part_source(hyperclean.digits_split, "test")


def model_objective(upper: Any, lower: Any, batch: dict[str, Tensor], log_l2: float = -4.0) -> Tensor:
    """Weighted training cross-entropy + exp(s)/2 (||W||^2 + ||b||^2). ``s`` is the variable
    ``log_l2`` when a level above declares it (else the keyword), the weights sigmoid(lam) when a
    level above declares ``lam`` (else 1)."""
    losses = nnf.cross_entropy(nnf.linear(batch["x"], lower["W"], lower["b"]), batch["y"], reduction="none")
    if "lam" in upper:
        lam = upper["lam"]
        index = batch["index"]
        losses = torch.sigmoid(lam if index.shape[0] == lam.shape[0] else lam[index]) * losses
    strength = torch.exp(upper["log_l2"]) if "log_l2" in upper else torch.exp(torch.tensor(log_l2, dtype=losses.dtype))
    return losses.mean() + 0.5 * strength * ((lower["W"] ** 2).sum() + (lower["b"] ** 2).sum())


def validation_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the model (W, b) on a clean split: the middle and the top objective."""
    return nnf.cross_entropy(nnf.linear(batch["x"], lower["W"], lower["b"]), batch["y"])


def report(upper: Any, lower: Any, log_l2: float = -4.0, **kwargs: Any) -> dict[str, Any]:
    """Test accuracy, the learned L2 strength, and (when the weights are learned) the F1 score of
    flagging the corrupted training labels as those with weight sigmoid(lam) < 1/2."""
    from sklearn.metrics import f1_score

    splits = hyperclean.digits_split(**kwargs)
    test, train = splits["test"], splits["train"]
    variables = {**dict(upper), **dict(lower)}
    W, b = variables["W"], variables["b"]
    with torch.no_grad():
        logits = nnf.linear(test["x"].to(W.device, W.dtype), W, b)
        out: dict[str, Any] = {"test_accuracy": (logits.argmax(1).cpu() == test["y"]).double().mean().item()}
        s = variables["log_l2"].item() if "log_l2" in variables else log_l2
        out["l2_strength"] = float(torch.exp(torch.tensor(s)))
        if "lam" in variables:
            flagged = (torch.sigmoid(variables["lam"]) < 0.5).cpu().numpy()
            out["detection_f1"] = float(f1_score(train["corrupted"].numpy(), flagged))
            out["flagged_corrupted"] = int(flagged.sum())
    return out
