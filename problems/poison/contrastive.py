"""The contrastive victim: SimCLR on small images, written with plain torch.

SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML) trains an encoder f and a projection head g without labels: two
random augmentations t1, t2 of each image of a batch of N, z = g(f(t(x))) normalized, and the
InfoNCE (NT-Xent) loss over the 2N views,

    L = 1/(2N) sum_i -log( exp(z_i . z_j(i) / tau) / sum_{k != i} exp(z_i . z_k / tau) ),

j(i) the other view of the same image. Downstream, a linear classifier on the frozen features
f(x) (the linear probe) measures what the encoder learned.

Augmentations (differentiable in the image, so that a trigger added before them receives
gradients through them): a random affine map per image (scale in [0.8, 1.1], rotation within
+-15 degrees, translation within +-1 pixel of an 8x8 image; bilinear resampling), a random
contrast in [0.6, 1.4] and brightness in [-0.2, 0.2], Gaussian noise of standard deviation 0.05,
clipped to [0, 1]: the crop-and-colour family of SimCLR, scaled to 8x8 grey digits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

__all__ = ["ContrastiveEncoder", "augment", "contrastive_encoder", "encoder_features", "info_nce", "train_contrastive"]


def augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One random view of each image of x (N, C, H, W) in [0, 1] (see the module docstring).
    ``generator`` (CPU) makes the views reproducible; None draws from the global generator."""
    n = x.shape[0]

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand((n, *shape), generator=generator).to(x)

    scale, angle = uniform(0.8, 1.1, 1), uniform(-math.pi / 12, math.pi / 12, 1)
    shift = uniform(-2.0 / x.shape[-1], 2.0 / x.shape[-1], 2)  # +-1 pixel in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.cat([cos, -sin, shift[:, :1]], 1), torch.cat([sin, cos, shift[:, 1:]], 1)], 1)
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    view = nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    view = view * uniform(0.6, 1.4, 1, 1, 1) + uniform(-0.2, 0.2, 1, 1, 1)
    noise = torch.randn(view.shape, generator=generator).to(x) if generator is not None else torch.randn_like(view)
    return (view + 0.05 * noise).clamp(0.0, 1.0)


def info_nce(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent of SimCLR over the 2N views (z1[i] and z2[i] are the two views of image i)."""
    z = nnf.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    n = z1.shape[0]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -1e4)  # finite: no inf * 0 in double backward
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return nnf.cross_entropy(logits, positives)


class ContrastiveEncoder(nn.Module):
    """f: two 3x3 convolutions (the second with stride 2) with ReLU, then a linear map to
    ``features``; g (the projection head): ReLU and a linear map to ``projection``.
    ``forward(x)`` returns f(x); ``forward(x, project=True)`` returns g(f(x))."""

    def __init__(self, in_shape: Sequence[int] = (1, 8, 8), features: int = 64, projection: int = 32, width: int = 16):
        super().__init__()
        channels, height, wide = in_shape
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * width * math.ceil(height / 2) * math.ceil(wide / 2), features),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(features, projection))

    def forward(self, x: Tensor, project: bool = False) -> Tensor:
        h = self.body(x)
        return self.head(h) if project else h


def contrastive_encoder(in_shape: Sequence[int] = (1, 8, 8), features: int = 64, projection: int = 32, width: int = 16) -> nn.Module:
    """Factory of the victim's encoder (a module variable: ``factory: problems.poison:contrastive_encoder``)."""
    return ContrastiveEncoder(in_shape, features, projection, width)


def train_contrastive(encoder: nn.Module, x: Tensor, steps: int = 800, batch_size: int = 128, lr: float = 0.1,
                      momentum: float = 0.9, temperature: float = 0.5, seed: int = 0) -> nn.Module:
    """SimCLR training of ``encoder`` on the images x (no labels): SGD with heavy-ball momentum (the
    surrogate victim of the bilevel problem trains the same way), seeded minibatches and views."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=lr, momentum=momentum)
    encoder.train()
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randperm(x.shape[0], generator=generator)[:batch_size].to(x.device)
            batch = x[index]
            loss = info_nce(encoder(augment(batch, generator), project=True), encoder(augment(batch, generator), project=True),
                            temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    encoder.eval()
    return encoder


@torch.no_grad()
def encoder_features(encoder: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    """f(x) of a trained encoder, in evaluation mode (what the linear probe sees)."""
    encoder.eval()
    return torch.cat([encoder(x[start : start + batch]) for start in range(0, x.shape[0], batch)])
