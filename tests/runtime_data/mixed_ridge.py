"""The ridge toy's data under a two-operation mixture, the shape of a DARTS cell edge: the
prediction is softmax(alpha)_0 X w + softmax(alpha)_1 tanh(X) w, so both levels' objectives
depend on the architecture weights alpha directly (as DARTS and RARTS need) and are means over
examples (as data parallelism needs)."""

import torch


def _residual(alpha, w, batch):
    p = torch.softmax(alpha, 0)
    return p[0] * (batch["X"] @ w) + p[1] * (torch.tanh(batch["X"]) @ w) - batch["t"]


def lower(upper, lower, batch, mu=0.1):
    """Training loss plus mu/2 ||w||^2."""
    w = lower["w"]
    return 0.5 * (_residual(upper["alpha"], w, batch) ** 2).mean() + 0.5 * mu * (w**2).sum()


def upper(upper, lower, batch):
    """Validation loss."""
    return 0.5 * (_residual(upper["alpha"], lower["w"], batch) ** 2).mean()
