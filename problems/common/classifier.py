"""The classifier a lower level trains in the image problems (the student of dataset
distillation, the victim of data poisoning): a module variable (any network of the images), or
tensor variables ``W`` (K, C*H*W) and ``b`` (K) of a linear softmax model, stored as
``nn.Linear`` stores them."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as nnf
from torch import Tensor

from bilevel.spec.errors import VariableError

__all__ = ["check_classifier_input", "classifier_logits", "classifier_squared_norm"]


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


def check_classifier_input(lower: Any, x: Tensor, module: str, images: str = "the images", variable: str | None = None) -> None:
    """Raise a VariableError when the classifier cannot take the images x (n, C, H, W), as far as
    its first parameter shows: a weight of shape (out, d) (``W``, or a module that flattens the
    image into a linear layer, as the ``problems.common`` models do) takes d = C*H*W values per
    image; a convolution weight (out, C, k, k) takes C channels. Other first layers are not
    checked.

    The error is at the classifier's declared input (``kwargs.in_shape`` of a module variable,
    ``shape`` of ``W``), or at the upper variable ``variable`` holding x when it is given (the
    synthetic images of a distillation, which the lower level cannot compare with the real data).
    Objectives call it before the forward pass, so that images of the wrong shape stop at one
    clear error instead of a matrix-product error from inside the network."""
    if module in lower:
        params = lower[module].params
        if not params:
            return
        first = next(iter(params.values()))
        name, field = module, "kwargs.in_shape"
    elif "W" in lower:
        first, name, field = lower["W"], "W", "shape"
    else:
        return
    values = math.prod(x.shape[1:])
    if first.dim() == 2 and first.shape[1] != values:
        takes = f"takes {first.shape[1]} values per image"
        expected = list(x.shape[1:]) if name == module else [first.shape[0], values]
    elif first.dim() == 4 and (x.dim() != 4 or first.shape[1] != x.shape[1]):
        takes, expected = f"takes images of {first.shape[1]} channels", list(x.shape[1:])
    else:
        return
    if variable is not None:
        raise VariableError(variable, f"has shape {list(x.shape)}, but the {module} {takes}: expected images of the shape"
                                      f" the {module} was built for")
    raise VariableError(name, f"{takes}, but {images} are {list(x.shape[1:])} ({values} values): expected {expected}", field=field)
