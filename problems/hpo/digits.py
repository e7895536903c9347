"""Hyperparameter optimization of neural networks on the digits data bundled with scikit-learn.

Three ways to tune the same kind of classifier (see problems/hpo/README.md):

* ``mlp_stn``: an MLP whose dropout rates (input and hidden) and L2 strength are tuned online by
  Self-Tuning Networks (MacKay et al. 2019). The network is built from STN layers, so its weights
  respond to the hyperparameters; the dropout rates act through sampled masks, which no
  hypergradient reaches.
* ``mlp_lr_wd``: a plain MLP whose inner learning rate and weight decay are tuned by
  differentiating through T optimizer steps (unrolled; Maclaurin et al. 2015, Franceschi et al. 2017).
* ``l2_per_weight``: multinomial logistic regression with one L2 strength per weight, tuned by
  implicit differentiation (Pedregosa 2016; Lorraine et al. 2020).

Data: 1797 8x8 digit images (64 features), shuffled with a fixed seed, split 500 train / 500
validation / 797 test, features standardized with the training split's statistics.
``train_fixed`` trains the plain MLP at fixed hyperparameters: one trial of a search
(benchmarks/hpo_search.py)."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from bilevel.data import DataStream
from bilevel.stn import StnLinear, dropout, hyper_input
from bilevel.trajectories import plot_trajectories
from problems.common.data import Split, bundled, part_source, shuffled_split, standardized

__all__ = [
    "Mlp",
    "StnMlp",
    "linear_lower",
    "linear_report",
    "linear_upper",
    "mlp_lower",
    "mlp_report",
    "mlp_upper",
    "split",
    "stn_lower",
    "stn_report",
    "stn_upper",
    "test_data",
    "train_data",
    "train_fixed",
    "val_data",
]

CLASSES, FEATURES = 10, 64


@lru_cache(maxsize=4)
def split(n_train: int = 500, n_val: int = 500, seed: int = 0) -> Split:
    """Shuffled, standardized digits splits {train, val, test} of {x, y} (float32 x, int64 y)."""
    features, labels = bundled("digits")
    return standardized(shuffled_split({"x": features, "y": labels}, n_train, n_val, seed), min_std=1.0)


train_data = part_source(split, "train")
val_data = part_source(split, "val")
test_data = part_source(split, "test")


def _on(batch: dict[str, Tensor], like: Tensor) -> dict[str, Tensor]:
    return {k: v.to(like.device, like.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


# --- the STN MLP -----------------------------------------------------------------------------
class StnMlp(nn.Module):
    """features -> hidden ReLU layers -> classes, every layer an StnLinear conditioned on h. The
    training objective passes dropout rates (input, hidden); the validation objective passes none."""

    def __init__(self, n_hyper: int, hidden: tuple[int, ...] = (128, 128), n_in: int = FEATURES, n_out: int = CLASSES):
        super().__init__()
        sizes = (n_in, *hidden, n_out)
        self.layers = nn.ModuleList(StnLinear(a, b, n_hyper) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor, h: Tensor, dropout_in: Tensor | None = None, dropout_hidden: Tensor | None = None) -> Tensor:
        if dropout_in is not None:
            x = dropout(x, dropout_in)
        for index, layer in enumerate(self.layers):
            x = layer(x, h)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
                if dropout_hidden is not None:
                    x = dropout(x, dropout_hidden)
        return x


def _l2(net: Any) -> Tensor:
    return sum((p * p).sum() for p in net.params.values())


def stn_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Training loss: CE with dropout at the (drawn) rates + l2/2 ||phi||^2."""
    net, h = lower["net"], hyper_input(upper)
    logits = net(batch["x"], h, upper["dropout_in"], upper["dropout_hidden"])
    return nnf.cross_entropy(logits, batch["y"]) + 0.5 * upper["l2"] * _l2(net)


def stn_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Validation loss: CE without dropout (the evaluation-mode network)."""
    return nnf.cross_entropy(lower["net"](batch["x"], hyper_input(upper)), batch["y"])


def _evaluate(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    loss = nnf.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return loss, accuracy


def stn_report(upper: Any, lower: Any, out_dir: Path | None = None, **data: Any) -> dict[str, Any]:
    """Validation and test loss / accuracy at the final hyperparameters, the hyperparameters, and
    the plot of their trajectories (hyperparameters.png in the run directory)."""
    h = hyper_input(upper)
    splits = split(**data)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name in ("val", "test"):
            batch = _on(splits[name], h)
            out[f"{name}_loss"], out[f"{name}_accuracy"] = _evaluate(lower["net"](batch["x"], h), batch["y"])
    out.update({name: float(upper[name]) for name in ("dropout_in", "dropout_hidden", "l2")})
    if out_dir is not None:
        plot_trajectories(out_dir, log_scale=("l2",))
    return out


# --- a plain MLP (unrolled learning-rate / weight-decay tuning, and search trials) ------------
class Mlp(nn.Module):
    """features -> hidden ReLU layers -> classes, with optional dropout (rates may be tensors)."""

    def __init__(self, hidden: tuple[int, ...] = (128, 128), n_in: int = FEATURES, n_out: int = CLASSES):
        super().__init__()
        sizes = (n_in, *hidden, n_out)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor, dropout_in: Any = None, dropout_hidden: Any = None) -> Tensor:
        if dropout_in is not None:
            x = dropout(x, dropout_in)
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
                if dropout_hidden is not None:
                    x = dropout(x, dropout_hidden)
        return x


def mlp_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Training CE (the weight decay comes from the inner solver's tuned weight_decay)."""
    return nnf.cross_entropy(lower["net"](batch["x"]), batch["y"])


def mlp_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Validation CE."""
    return nnf.cross_entropy(lower["net"](batch["x"]), batch["y"])


def mlp_report(upper: Any, lower: Any, out_dir: Path | None = None, **data: Any) -> dict[str, Any]:
    """Validation and test loss / accuracy of the final network, the tuned values and their plot."""
    like = next(iter(lower["net"].params.values()))
    splits = split(**data)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name in ("val", "test"):
            batch = _on(splits[name], like)
            out[f"{name}_loss"], out[f"{name}_accuracy"] = _evaluate(lower["net"](batch["x"]), batch["y"])
    out.update({name: float(value) for name, value in upper.items() if isinstance(value, Tensor) and value.numel() == 1})
    if out_dir is not None:
        plot_trajectories(out_dir, log_scale=tuple(out))
    return out


# --- per-weight L2 of multinomial logistic regression (implicit) ------------------------------
def linear_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Training CE + 1/2 sum_ij l2_ij W_ij^2 (one strength per weight)."""
    net = lower["net"]
    return nnf.cross_entropy(net(batch["x"]), batch["y"]) + 0.5 * (upper["l2"] * net.params["weight"] ** 2).sum()


def linear_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """Validation CE."""
    return nnf.cross_entropy(lower["net"](batch["x"]), batch["y"])


def linear_report(upper: Any, lower: Any, **data: Any) -> dict[str, Any]:
    """Validation and test loss / accuracy, and the spread of the learned strengths."""
    like = lower["net"].params["weight"]
    splits = split(**data)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name in ("val", "test"):
            batch = _on(splits[name], like)
            out[f"{name}_loss"], out[f"{name}_accuracy"] = _evaluate(lower["net"](batch["x"]), batch["y"])
        strengths = upper["l2"]
        out.update(l2_min=strengths.min().item(), l2_median=strengths.median().item(), l2_max=strengths.max().item())
    return out


# --- one trial of a search: the plain MLP at fixed hyperparameters ----------------------------
def train_fixed(
    dropout_in: float,
    dropout_hidden: float,
    l2: float,
    steps: int,
    batch_size: int = 100,
    lr: float = 1e-3,
    hidden: tuple[int, ...] = (128, 128),
    seed: int = 0,
    data: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train the plain MLP for ``steps`` Adam steps on minibatches with the given dropout rates and
    L2 strength (the training loss of ``stn_lower``); return validation and test loss / accuracy
    and the wall time. Plain PyTorch (minibatches from the DataStream a run draws them from): the
    search baselines pay no framework overhead."""
    began = time.perf_counter()
    splits = split(**(data or {}))
    torch.manual_seed(seed)
    net = Mlp(hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    batches = DataStream(splits["train"], batch_size, seed)  # the minibatches a run's lower level draws
    for _ in range(steps):
        batch = batches.next()
        logits = net(batch["x"], dropout_in, dropout_hidden)
        loss = nnf.cross_entropy(logits, batch["y"]) + 0.5 * l2 * sum((p * p).sum() for p in net.parameters())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    out: dict[str, float] = {}
    with torch.no_grad():
        for name in ("val", "test"):
            out[f"{name}_loss"], out[f"{name}_accuracy"] = _evaluate(net(splits[name]["x"]), splits[name]["y"])
    out["wall_time_s"] = time.perf_counter() - began
    return out
