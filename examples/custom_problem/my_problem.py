"""A problem defined entirely in a user's own file: learn one loss weight per class so that a
classifier trained on an imbalanced training set does well on a balanced validation set.

    lower:  w*(a) = argmin_w  mean_i s_{c_i}(a) CE(f_w(x_i), c_i) + mu/2 ||w||^2,   s(a) = K softmax(a)
    upper:  min_a  (1/K) sum_k  mean validation CE of class k           (class-balanced)

Data: the wine set bundled with scikit-learn (178 examples, 3 classes), two of its 13 features
(alcohol, malic acid: the classes overlap, so the imbalance matters), standardized. Shuffled with
a fixed seed and split 90 train / 44 validation / 44 test; the training split keeps only a quarter
of its class-0 examples."""

from functools import lru_cache

import torch
import torch.nn.functional as F

FEATURES = [0, 1]  # alcohol, malic acid
K = 3  # classes


@lru_cache(maxsize=1)
def _splits(seed=0):
    from sklearn.datasets import load_wine

    x, c = load_wine(return_X_y=True)
    order = torch.randperm(len(c), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(x[:, FEATURES], dtype=torch.float32)[order]
    c = torch.as_tensor(c)[order]
    x = (x - x.mean(0)) / x.std(0)
    train = torch.arange(0, 90)
    class0 = train[c[train] == 0]
    train = train[~torch.isin(train, class0[len(class0) // 4 :])]  # drop 3/4 of class 0
    val, test = torch.arange(90, 134), torch.arange(134, len(c))
    return {name: {"x": x[idx], "c": c[idx]} for name, idx in (("train", train), ("val", val), ("test", test))}


def train_data():
    return dict(_splits()["train"])


def val_data():
    return dict(_splits()["val"])


def training_loss(upper, lower, batch, mu=0.1):
    """G: class-weighted cross-entropy of the linear classifier + L2."""
    weights = K * torch.softmax(upper["a"], 0)
    losses = F.cross_entropy(lower["net"](batch["x"]), batch["c"], reduction="none")
    l2 = sum((p**2).sum() for p in lower["net"].params.values())
    return (weights[batch["c"]] * losses).mean() + 0.5 * mu * l2


def balanced_validation_loss(upper, lower, batch):
    """F: the validation cross-entropy averaged per class, then over classes."""
    losses = F.cross_entropy(lower["net"](batch["x"]), batch["c"], reduction="none")
    per_class = torch.zeros(K, dtype=losses.dtype, device=losses.device).index_add(0, batch["c"], losses)
    return (per_class / torch.bincount(batch["c"], minlength=K).to(losses.dtype)).mean()


def _balanced_accuracy(logits, c):
    predicted = logits.argmax(1)
    return sum(((predicted == k) & (c == k)).sum().item() / (c == k).sum().item() for k in range(K)) / K


def report(upper, lower, mu=0.1):
    """Balanced accuracy on validation and test, and that of the unweighted classifier (a = 0)."""
    splits, device = _splits(), upper["a"].device
    with torch.no_grad():
        val = _balanced_accuracy(lower["net"](splits["val"]["x"].to(device)).cpu(), splits["val"]["c"])
        test = _balanced_accuracy(lower["net"](splits["test"]["x"].to(device)).cpu(), splits["test"]["c"])
    # baseline: the same classifier trained with equal weights (L-BFGS to convergence)
    x, c = splits["train"]["x"].double(), splits["train"]["c"]
    W = torch.zeros(K, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(K, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, c) + 0.5 * mu * ((W**2).sum() + (b**2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        unweighted = _balanced_accuracy(splits["test"]["x"].double() @ W.T + b, splits["test"]["c"])
    return {
        "balanced_val_accuracy": val,
        "balanced_test_accuracy": test,
        "unweighted_balanced_test_accuracy": unweighted,
        "class_weights": (K * torch.softmax(upper["a"], 0)).tolist(),
        "train_class_counts": torch.bincount(c, minlength=K).tolist(),
    }
