"""The macro search space: a chain of convolutional layers, each choosing a kernel size and a width.

The architecture (upper level) holds, per layer l, logits alpha^k_l over the kernel sizes and
alpha^w_l over the widths; candidate (k, c) of layer l has weight p_{l,k} q_{l,c}, p = softmax(alpha^k_l),
q = softmax(alpha^w_l) (the product weights of TangleNAS's macro spaces; Sukthanker et al. 2024,
"Weight-Entanglement Meets Gradient-Based Neural Architecture Search", ``automl/TangleNAS``,
``toy_search_spaces/conv_macro``). The supernet (lower level) is either

- entangled: one C x C_in x K x K weight per layer, the candidates its centred k x k kernels and
  its first c output channels (``EntangledConvLayer``): one convolution per layer;
- separate: one convolution per candidate (k, c), its output zero-padded to the widest and mixed
  as DARTS mixes operations, sum_{k,c} p_k q_c o_{k,c}(x): one weight per candidate.

Both are searched by the DARTS engines; the derived architecture keeps, per layer, the kernel of
largest p and the width of largest q (``derive_macro_genotype``), and is trained from scratch as
a plain chain conv(k_l, c_l) -> BN -> ReLU (``MacroNetwork``). sharpDARTS's MaxW weighting
(``op_weighting: max_w``) applies to each row: 1 - max p + p."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from bilevel.nas.entangled import EntangledConvLayer
from bilevel.nas.supernet import ArchitectureWeights, max_w

__all__ = [
    "MacroArchitecture",
    "MacroGenotype",
    "MacroNetwork",
    "MacroSupernet",
    "SeparateConvLayer",
    "check_macro_genotype",
    "derive_macro_genotype",
    "random_macro_genotype",
]


@dataclass(frozen=True)
class MacroGenotype:
    """A discrete macro architecture: (kernel size, width) of every layer."""

    layers: tuple[tuple[int, int], ...]

    def to_json(self) -> dict[str, list[list[int]]]:
        return {"layers": [[k, w] for k, w in self.layers]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MacroGenotype":
        """From {"layers": [[kernel, width], ...]} or an object holding that under "genotype"."""
        layers = data["genotype"] if "genotype" in data else data
        return cls(tuple((int(k), int(w)) for k, w in layers["layers"]))

    @classmethod
    def load(cls, path: str | Path) -> "MacroGenotype":
        return cls.from_json(json.loads(Path(path).read_text()))

    def skip_count(self, cell_type: str = "normal") -> int:
        """A macro architecture has no skip connections (the genotype files record the count)."""
        return 0

    @property
    def cells(self) -> dict[str, Any]:
        return {}


def check_macro_genotype(genotype: MacroGenotype, space: Any) -> tuple[str, str] | None:
    """The first reason ``genotype`` is not an architecture of ``space`` (dotted path under the
    genotype, message), or None."""
    if len(genotype.layers) != space.layers:
        return "layers", f"{len(genotype.layers)} layers; the search space has {space.layers}"
    for index, (kernel, width) in enumerate(genotype.layers):
        if kernel not in space.kernels:
            return f"layers.{index}", f"kernel {kernel} is not one of the space's kernels {space.kernels}"
        if width not in space.widths:
            return f"layers.{index}", f"width {width} is not one of the space's widths {space.widths}"
    return None


def derive_macro_genotype(weights: Mapping[str, Tensor], space: Any) -> MacroGenotype:
    """Per layer, the kernel of largest softmax weight and the width of largest softmax weight."""
    kernels = weights["kernel"].detach().argmax(-1).tolist()
    widths = weights["width"].detach().argmax(-1).tolist()
    return MacroGenotype(tuple((space.kernels[k], space.widths[w]) for k, w in zip(kernels, widths)))


def random_macro_genotype(space: Any, generator: torch.Generator) -> MacroGenotype:
    """Kernel and width of every layer drawn uniformly."""
    layers = []
    for _ in range(space.layers):
        k = int(torch.randint(len(space.kernels), (1,), generator=generator))
        w = int(torch.randint(len(space.widths), (1,), generator=generator))
        layers.append((space.kernels[k], space.widths[w]))
    return MacroGenotype(tuple(layers))


class MacroArchitecture(nn.Module):
    """The logits of a macro space: ``kernel`` (layers, kernels) and ``width`` (layers, widths).
    Calling it returns their softmax as ArchitectureWeights ({"kernel": ..., "width": ...})."""

    def __init__(self, spec: Any, base_dir: Path | None = None):
        super().__init__()
        self.spec = spec
        self.base_dir = base_dir or Path.cwd()
        space = spec.space
        self.kernel = nn.Parameter(spec.init_scale * torch.randn(space.layers, len(space.kernels)))
        self.width = nn.Parameter(spec.init_scale * torch.randn(space.layers, len(space.widths)))

    def forward(self) -> ArchitectureWeights:
        weights = {"kernel": torch.softmax(self.kernel, dim=-1), "width": torch.softmax(self.width, dim=-1)}
        return ArchitectureWeights(weights, self.spec, self.base_dir, [])


class SeparateConvLayer(nn.Module):
    """One weight per candidate: sum_{k,c} p_k q_c pad_C(ReLU(BN(conv_{k,c}(x)))), conv_{k,c} a
    c-channel k x k convolution of its own, zero-padded to the widest C."""

    def __init__(self, c_in: int, kernels: list[int], widths: list[int], affine: bool = False):
        super().__init__()
        self.kernels, self.widths = kernels, widths
        self.largest_width = max(widths)
        self.candidates = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c, affine=affine), nn.ReLU())
            for k in kernels for c in widths
        )

    def forward(self, x: Tensor, kernel_weights: Tensor, width_weights: Tensor) -> Tensor:
        total = None
        index = 0
        for p in kernel_weights:
            for c, q in zip(self.widths, width_weights):
                out = nnf.pad(self.candidates[index](x), (0, 0, 0, 0, 0, self.largest_width - c))
                term = (p * q) * out
                total = term if total is None else total + term
                index += 1
        return total  # type: ignore[return-value]


class MacroSupernet(nn.Module):
    """The supernet of a macro space; ``forward(x, weights)`` with the architecture's weights."""

    def __init__(self, spec: Any):
        super().__init__()
        self.spec = spec
        space = spec.space
        layer = EntangledConvLayer if space.mixed_op == "entangled" else SeparateConvLayer
        channels = space.in_channels
        self.layers = nn.ModuleList()
        for _ in range(space.layers):
            self.layers.append(layer(channels, list(space.kernels), list(space.widths)))
            channels = max(space.widths)
        self.pool_after = set(space.pool_after)
        self.classifier = nn.Linear(channels, space.classes)

    def forward(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        if weights is None:
            raise TypeError("the supernet needs the architecture's mixture weights: net(x, upper['arch']())")
        kernel, width = weights["kernel"], weights["width"]
        if self.spec.space.op_weighting == "max_w":
            kernel, width = max_w(kernel), max_w(width)
        for index, layer in enumerate(self.layers):
            x = layer(x, kernel[index], width[index])
            if index in self.pool_after:
                x = nnf.max_pool2d(x, 2, ceil_mode=True)
        return self.classifier(x.mean(dim=(2, 3)))

    def uniform_weights(self) -> dict[str, Tensor]:
        """Uniform mixture weights of the right shapes (for memory estimates)."""
        space = self.spec.space
        param = next(self.parameters())
        def uniform(n: int) -> Tensor:
            return torch.full((space.layers, n), 1.0 / n, dtype=param.dtype, device=param.device)
        return {"kernel": uniform(len(space.kernels)), "width": uniform(len(space.widths))}


class MacroNetwork(nn.Module):
    """A derived macro architecture: conv(k_l x k_l, c_l) -> BN -> ReLU per layer (pooling after the
    space's ``pool_after`` layers), global average pooling, a linear classifier."""

    def __init__(self, space: Any, genotype: MacroGenotype):
        super().__init__()
        problem = check_macro_genotype(genotype, space)
        if problem is not None:
            raise ValueError(f"genotype.{problem[0]}: {problem[1]}")
        blocks, channels = [], space.in_channels
        for kernel, width in genotype.layers:
            blocks.append(nn.Sequential(nn.Conv2d(channels, width, kernel, padding=kernel // 2, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU()))
            channels = width
        self.layers = nn.ModuleList(blocks)
        self.pool_after = set(space.pool_after)
        self.classifier = nn.Linear(channels, space.classes)

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.pool_after:
                x = nnf.max_pool2d(x, 2, ceil_mode=True)
        return self.classifier(x.mean(dim=(2, 3)))
