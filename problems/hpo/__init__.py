"""Hyperparameter optimization of L2 regularization for logistic regression (Pedregosa 2016,
"Hyperparameter optimization with approximate gradient"; Lorraine et al. 2020).

    w*(lam) = argmin_w  mean_i BCE(x_i^T w + b, t_i) + 1/2 sum_j exp(lam_j) w_j^2
    min_lam  mean_{i in val} BCE(x_i^T w*(lam) + b*, t_i)

``lam`` is one scalar (a single strength) or one entry per feature (per-feature strengths, an
automatic-relevance flavour). Data: the breast-cancer set bundled with scikit-learn (569 x 30),
standardized on the training split and split 200 train / 150 validation / 219 test.

The digits presets (an MLP's dropout and L2 by STN, its learning rate and weight decay by
unrolling, per-weight L2 by implicit differentiation) live in ``problems.hpo.digits``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from problems.common.data import Split, bundled, part_source, shuffled_split, standardized

__all__ = ["lower_objective", "report", "split", "test_data", "train_data", "upper_objective", "val_data"]


@lru_cache(maxsize=4)
def split(n_train: int = 200, n_val: int = 150, seed: int = 0) -> Split:
    """Shuffled, standardized breast-cancer splits {train, val, test} of {x, t} (float32; x
    standardized with the training split's statistics, t = 1 for benign)."""
    features, labels = bundled("breast_cancer")
    return standardized(shuffled_split({"x": features, "t": labels.float()}, n_train, n_val, seed), min_std=1e-8)


train_data = part_source(split, "train")
val_data = part_source(split, "val")
test_data = part_source(split, "test")


def _bce(lower: Any, batch: dict[str, Tensor]) -> Tensor:
    return nnf.binary_cross_entropy_with_logits(batch["x"] @ lower["w"] + lower["b"], batch["t"])


def lower_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Training BCE + 1/2 sum_j exp(lam_j) w_j^2 (lam scalar or per feature)."""
    return _bce(lower, batch) + 0.5 * (torch.exp(upper["lam"]) * lower["w"] ** 2).sum()


def upper_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Validation BCE."""
    return _bce(lower, batch)


def report(upper: Any, lower: Any, **kwargs: Any) -> dict[str, Any]:
    """Test loss and accuracy, and the learned strengths exp(lam)."""
    test = split(**kwargs)["test"]
    device, dtype = lower["w"].device, lower["w"].dtype
    batch = {k: v.to(device, dtype) for k, v in test.items()}
    with torch.no_grad():
        logits = batch["x"] @ lower["w"] + lower["b"]
        loss = nnf.binary_cross_entropy_with_logits(logits, batch["t"]).item()
        accuracy = ((logits > 0).to(dtype) == batch["t"]).to(torch.float64).mean().item()
        strength = torch.exp(upper["lam"]).cpu()
    return {
        "test_loss": loss,
        "test_accuracy": accuracy,
        "l2_strength_min": strength.min().item(),
        "l2_strength_max": strength.max().item(),
    }
