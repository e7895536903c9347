"""A small self-supervised teacher: the target representations of KRR-ST.

Lee, Lee, Kim, Kawaguchi, Hwang, "Self-Supervised Dataset Distillation for Transfer Learning"
(ICLR 2024; KRR-ST) distill a set of (image, representation) pairs, where the representations
come from a feature extractor trained with Barlow Twins (Zbontar et al. 2021) on the unlabeled
data. Their teacher is a ResNet trained on CIFAR-100; offline on digits we train a small one in
a few seconds instead:

    encoder f:   flatten -> Linear(d, 256) -> ReLU -> Linear(256, 32)       (the representation)
    projector p: ReLU -> Linear(32, 128)                                     (training only)
    views        a, b = aug(x), aug(x)     (random 1-pixel shift, Gaussian noise 0.1, 10% pixel drop)
    C            = z_a^T z_b / n with z = batch-standardized p(f(view))
    loss         = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2     (Barlow Twins, lambda = 5e-3)

1000 Adam steps (lr 3e-3, batch 256; about 2 s on one CPU core). The representations f(x) are
standardized with the pool's mean and standard deviation, so every target dimension has unit
scale. Labels are never used. On digits this teacher is a modest one: a linear probe on its
features with 2 / 5 labels per class reaches about 0.80 / 0.85 test accuracy, against 0.77 / 0.86
on raw pixels."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from problems.distill.data import real_split

__all__ = ["augment", "barlow_twins_loss", "encoder", "representations", "teacher"]

REPRESENTATION_DIM = 32


def encoder(in_features: int = 64, hidden: int = 256, out: int = REPRESENTATION_DIM) -> nn.Module:
    """The teacher's architecture (also the student pretrained on a distilled set)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out))


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """A random view: shift by up to one pixel (zero padded), Gaussian noise, 10% pixels dropped."""
    n, _, h, w = x.shape
    padded = nnf.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    shifted = shifted.gather(3, cols)
    noisy = shifted + 0.1 * torch.randn(shifted.shape, generator=gen)
    keep = (torch.rand(shifted.shape, generator=gen) > 0.1).to(x.dtype)
    return noisy * keep


def barlow_twins_loss(za: Tensor, zb: Tensor, redundancy: float = 5e-3) -> Tensor:
    """Zbontar et al. 2021: the cross-correlation of the two views' standardized embeddings
    driven to the identity."""
    n = za.shape[0]
    za = (za - za.mean(0)) / (za.std(0) + 1e-6)
    zb = (zb - zb.mean(0)) / (zb.std(0) + 1e-6)
    c = za.T @ zb / n
    on_diagonal = ((torch.diagonal(c) - 1) ** 2).sum()
    off_diagonal = (c**2).sum() - (torch.diagonal(c) ** 2).sum()
    return on_diagonal + redundancy * off_diagonal


@lru_cache(maxsize=4)
def teacher(dataset: str = "digits", n_train: int = 1000, seed: int = 0, path: str | None = None, steps: int = 1000) -> tuple[nn.Module, Tensor, Tensor]:
    """(encoder, mean, std) trained with Barlow Twins on the unlabeled training pool (CPU, seeded)."""
    pool = real_split(dataset, n_train, seed, path)["train"]["x"]
    gen = torch.Generator().manual_seed(seed + 17)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 17)
        net = encoder(pool[0].numel())
        projector = nn.Sequential(nn.ReLU(), nn.Linear(REPRESENTATION_DIM, 128))
    optimizer = torch.optim.Adam([*net.parameters(), *projector.parameters()], lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randint(0, pool.shape[0], (min(256, pool.shape[0]),), generator=gen)
            batch = pool[index]
            loss = barlow_twins_loss(projector(net(augment(batch, gen))), projector(net(augment(batch, gen))))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        features = net(pool)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, features.mean(0), features.std(0) + 1e-6


def representations(x: Tensor, dataset: str = "digits", n_train: int = 1000, seed: int = 0, path: str | None = None, steps: int = 1000) -> Tensor:
    """The teacher's standardized representations of images ``x`` (n, REPRESENTATION_DIM)."""
    net, mean, std = teacher(dataset, n_train, seed, path, steps)
    with torch.no_grad():
        return (net(x.cpu().float()) - mean) / std
