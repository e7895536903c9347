"""Training evaluation models: fresh networks with Adam on a (small) training set, and the convex
linear victim to convergence with L-BFGS. Used by reports, never inside a hypergradient."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

__all__ = ["accuracy", "fit_linear", "train_model"]


def _loss(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return 0.5 * ((outputs - targets) ** 2).sum(1).mean()
    return nnf.cross_entropy(outputs, targets)  # integer labels, or class probabilities (soft labels)


def train_model(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    *,
    loss: Literal["ce", "mse"] = "ce",
    steps: int = 300,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    batch_size: int | None = 256,
    seed: int = 0,
) -> nn.Module:
    """Adam on ``loss`` (ce: integer labels or soft-label probabilities; mse: regression targets),
    full batch when the set has at most ``batch_size`` examples, else seeded minibatches."""
    x, targets = x.detach(), targets.detach()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    full = batch_size is None or x.shape[0] <= batch_size
    with torch.enable_grad():
        _adam_steps(model, optimizer, x, targets, loss, steps, None if full else batch_size, gen)
    model.eval()
    return model


def _adam_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, targets: Tensor, loss: str,
                steps: int, batch_size: int | None, gen: torch.Generator) -> None:
    n = x.shape[0]
    for _ in range(steps):
        if batch_size is None:
            xb, tb = x, targets
        else:
            index = torch.randint(0, n, (batch_size,), generator=gen).to(x.device)
            xb, tb = x[index], targets[index]
        optimizer.zero_grad(set_to_none=True)
        _loss(model(xb), tb, loss).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 4096) -> float:
    """Fraction of ``x`` whose argmax output is ``y``."""
    correct = 0
    for start in range(0, x.shape[0], batch):
        correct += int((model(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum())
    return correct / max(x.shape[0], 1)


def fit_linear(x: Tensor, targets: Tensor, classes: int, mu: float, max_iter: int = 500) -> nn.Module:
    """Softmax regression with L2 penalty mu/2 ||W||^2 + mu/2 ||b||^2 minimized to convergence
    (L-BFGS, float64): the unique solution of a strongly convex problem, independent of the start."""
    flat = x.detach().reshape(x.shape[0], -1).double()
    model = nn.Linear(flat.shape[1], classes).to(device=x.device, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    soft = targets.is_floating_point()
    target = targets.detach().double() if soft else targets

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = nnf.cross_entropy(model(flat), target) + 0.5 * mu * sum((p * p).sum() for p in model.parameters())
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)
    linear_model = nn.Sequential(nn.Flatten(), model).eval()
    return _Float64Input(linear_model)


class _Float64Input(nn.Module):
    """Runs a float64 model on inputs of any floating dtype."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.double())
