"""A one-hidden-layer ReLU regression whose inner gradient has entries that are exactly zero at
every step: hidden unit 0 is dead on all the data (its bias is -100), so the gradients of its
incoming weights, its bias and its outgoing weight are 0; ``unused`` never enters the objective.
The upper level weights the training examples (sigmoid(lam_i)), as in data hyper-cleaning."""

from __future__ import annotations

import torch

N, D, H = 24, 3, 4


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(11)


def train_data() -> dict[str, torch.Tensor]:
    gen = _gen()
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return {"x": x, "t": torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(N, 1, generator=gen, dtype=torch.float64)}


def val_data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return {"x": x, "t": torch.sin(x.sum(1, keepdim=True))}


def init_w1() -> torch.Tensor:
    return 0.5 * torch.randn(H, D, generator=torch.Generator().manual_seed(13), dtype=torch.float64)


def init_b1() -> torch.Tensor:
    b = 0.1 * torch.randn(H, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    b[0] = -100.0  # dead on every example: |w1 x| < 100
    return b


def init_w2() -> torch.Tensor:
    return 0.5 * torch.randn(1, H, generator=torch.Generator().manual_seed(15), dtype=torch.float64)


def predict(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w1.T + b1) @ w2.T + b2


def lower(upper, lower, batch):
    out = predict(lower["w1"], lower["b1"], lower["w2"], lower["b2"], batch["x"])
    return (torch.sigmoid(upper["lam"]) * ((out - batch["t"]) ** 2).squeeze(1)).mean()


def upper(upper, lower, batch):
    out = predict(lower["w1"], lower["b1"], lower["w2"], lower["b2"], batch["x"])
    return ((out - batch["t"]) ** 2).mean()
