"""The classifier a lower level trains in the image problems (the student of dataset
distillation, the victim of data poisoning): a module variable (any network of the images), or
tensor variables ``W`` (K, C*H*W) and ``b`` (K) of a linear softmax model, stored as
``nn.Linear`` stores them."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as nnf
from torch import Tensor

__all__ = ["classifier_logits", "classifier_squared_norm"]


def classifier_logits(lower: Any, x: Tensor, module: str) -> Tensor:
    """Logits of images x (n, C, H, W): the module variable named ``module`` when the level
    declares one, else the linear model x W^T + b on the flattened images."""
    if module in lower:
        return lower[module](x)
    return nnf.linear(x.reshape(x.shape[0], -1), lower["W"], lower["b"])


def classifier_squared_norm(lower: Any, module: str) -> Tensor:
    """||theta||^2: the sum of squares of the module's parameters, or of W and b."""
    params = list(lower[module].params.values()) if module in lower else [lower["W"], lower["b"]]
    return sum((p * p).sum() for p in params)
