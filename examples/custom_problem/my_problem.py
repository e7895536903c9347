"""A problem defined entirely in a user's own file: learn one loss weight per class so that a
classifier trained on an imbalanced training set does well on a balanced validation set.

    lower:  w*(a) = argmin_w  mean_i softmax(a)_{c_i} * K * CE(f_w(x_i), c_i) + mu/2 ||w||^2
    upper:  min_a  mean over classes of the validation CE of that class

Data: the wine set bundled with scikit-learn (178 x 13, 3 classes), standardized; the training
split keeps only a quarter of class 0."""

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def _splits(seed=0):
    from sklearn.datasets import load_wine

    x, c = load_wine(return_X_y=True)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(c), generator=gen)
    x = torch.as_tensor(x, dtype=torch.float32)[order]
    c = torch.as_tensor(c)[order]
    x = (x - x.mean(0)) / x.std(0)
    train_idx, val_idx = torch.arange(0, 100), torch.arange(100, len(c))
    keep = torch.ones(100, dtype=torch.bool)
    class0 = (c[train_idx] == 0).nonzero().flatten()
    keep[class0[len(class0) // 4 :]] = False  # imbalance: drop three quarters of class 0
    train_idx = train_idx[keep]
    return {"train": {"x": x[train_idx], "c": c[train_idx]}, "val": {"x": x[val_idx], "c": c[val_idx]}}


def train_data():
    return dict(_splits()["train"])


def val_data():
    return dict(_splits()["val"])


def training_loss(upper, lower, batch, mu=1e-2):
    weights = torch.softmax(upper["a"], 0) * upper["a"].shape[0]
    losses = F.cross_entropy(lower["net"](batch["x"]), batch["c"], reduction="none")
    reg = sum((p**2).sum() for p in lower["net"].params.values())
    return (weights[batch["c"]] * losses).mean() + 0.5 * mu * reg


def balanced_validation_loss(upper, lower, batch):
    losses = F.cross_entropy(lower["net"](batch["x"]), batch["c"], reduction="none")
    per_class = torch.zeros(3, dtype=losses.dtype).index_add(0, batch["c"], losses)
    counts = torch.bincount(batch["c"], minlength=3).to(losses.dtype)
    return (per_class / counts).mean()


def report(upper, lower):
    val = _splits()["val"]
    with torch.no_grad():
        predicted = lower["net"](val["x"].to(upper["a"])).argmax(1)
        recalls = [((predicted == k) & (val["c"] == k)).sum().item() / (val["c"] == k).sum().item() for k in range(3)]
    return {"balanced_val_accuracy": sum(recalls) / 3, "class_weights": (torch.softmax(upper["a"], 0) * 3).tolist()}
