"""Hyper-representation with a recurrent encoder (the setting of BO-REP, Hao et al. 2024, ICLR;
hyper-representation: Franceschi et al. 2018, "Bilevel Programming for Hyperparameter
Optimization and Meta-Learning").

The upper variable is the representation: an Elman RNN encoder phi mapping a sequence to its last
hidden state. The lower variable is a linear head w on those features, trained with L2 (strongly
convex in w):

    w*(phi) = argmin_w  mean_{train} CE(w h_phi(s_i), c_i) + mu/2 ||w||^2
    min_phi   mean_{val} CE(w*(phi) h_phi(s_i), c_i)

A recurrent upper level is the case of unbounded smoothness that BO-REP targets: the upper
gradient's Lipschitz constant grows with the gradient itself (exploding recurrences).

Data: synthetic sequences (no download): s_t ~ N(0, 1) in R^d, length L; the class is which of K
fixed random directions has the largest time-discounted correlation with the sequence, so the
label needs memory across time steps."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from problems.common.data import part_source

__all__ = ["ElmanEncoder", "encoder", "mlp_encoder", "lower_objective", "report", "sequences", "train_data", "upper_objective", "val_data"]


class ElmanEncoder(nn.Module):
    """h_t = tanh(W_x s_t + W_h h_{t-1} + b); returns h_L. Written with Linear layers so that it
    runs under torch.func.functional_call and double backward on every device."""

    def __init__(self, d_in: int = 4, hidden: int = 32):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.hidden = hidden

    def forward(self, s: Tensor) -> Tensor:  # s: (batch, length, d_in)
        h = torch.zeros(s.shape[0], self.hidden, dtype=s.dtype, device=s.device)
        drive = self.inp(s)
        for t in range(s.shape[1]):
            h = torch.tanh(drive[:, t] + self.rec(h))
        return h


def encoder(d_in: int = 4, hidden: int = 32) -> nn.Module:
    """The recurrent encoder (unbounded smoothness)."""
    return ElmanEncoder(d_in, hidden)


def mlp_encoder(d_in: int = 4, length: int = 12, hidden: int = 32) -> nn.Module:
    """A feed-forward encoder of the flattened sequence (the classic hyper-representation setting)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in * length, hidden), nn.Tanh())


@lru_cache(maxsize=8)
def sequences(n_train: int = 400, n_val: int = 200, n_test: int = 400, length: int = 12, d_in: int = 4,
              classes: int = 4, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(classes, d_in, generator=gen)
    discount = 0.8 ** torch.arange(length - 1, -1, -1, dtype=torch.float32)

    def draw(n: int) -> dict[str, Tensor]:
        s = torch.randn(n, length, d_in, generator=gen)
        score = torch.einsum("nld,kd,l->nk", s, directions, discount)
        return {"s": s, "c": score.argmax(1)}

    return {"train": draw(n_train), "val": draw(n_val), "test": draw(n_test)}


train_data = part_source(sequences, "train")
val_data = part_source(sequences, "val")


def _logits(upper: Any, lower: Any, s: Tensor) -> Tensor:
    return nnf.linear(upper["encoder"](s), lower["W"], lower["b"])


def lower_objective(upper: Any, lower: Any, batch: dict[str, Tensor], mu: float = 1e-2) -> Tensor:
    """Training CE of the linear head on the encoder's features + mu/2 ||w||^2."""
    loss = nnf.cross_entropy(_logits(upper, lower, batch["s"]), batch["c"])
    return loss + 0.5 * mu * ((lower["W"] ** 2).sum() + (lower["b"] ** 2).sum())


def upper_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Validation CE."""
    return nnf.cross_entropy(_logits(upper, lower, batch["s"]), batch["c"])


def report(upper: Any, lower: Any, **kwargs: Any) -> dict[str, float]:
    test = sequences(**kwargs)["test"]
    with torch.no_grad():
        logits = _logits(upper, lower, test["s"].to(lower["W"]))
        return {"test_loss": float(nnf.cross_entropy(logits, test["c"].to(logits.device))),
                "test_accuracy": float((logits.argmax(1).cpu() == test["c"]).double().mean())}
