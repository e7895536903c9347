"""Weight-entangled candidate operations: candidates of one family share one superposed weight.

Sukthanker, Krishnakumar, Safari & Hutter, "Weight-Entanglement Meets Gradient-Based Neural
Architecture Search" (AutoML 2024, arXiv:2312.10440; official code ``automl/TangleNAS``). Where
DARTS gives every candidate operation of an edge its own weights, candidates that differ only in
their kernel size are one operation at the largest kernel, whose smaller kernels are its centre:
with m_k the k x k centre mask of a K x K kernel (K the largest) and weights u_k over the family,

    W~ = W (.) sum_k u_k m_k,        sum_k u_k o_k(x) = o(x; W~)     (convolution is linear in W)

for the convolution that carries the kernel size; everything else in the operation (pointwise
convolutions, BatchNorm) is shared as it is. One convolution runs instead of one per candidate,
so the parameters and the activations of the family are those of its largest member.

Families here (a smaller kernel padded to the larger one computes the same output positions):
sep_conv 3x3 / 5x5, dil_conv 3x3 / 5x5, conv 1x1 / 3x3, sharp_sep_conv 3x3 / 5x5,
sharp_dil_conv 3x3 / 5x5. ``MixedOp`` puts a family into the DARTS mixture with its total weight
w_f = sum_{o in f} w_o and superposes it with u_o = w_o / w_f:

    o_e(x) = sum_{o not entangled} w_o o(x) + sum_f w_f o_f(x; W_f (.) sum_{o in f} u_o m_{k_o}),

which is the DARTS mixture of the candidates whenever they share their weights and is exact at a
one-hot architecture. (The official cell code feeds the softmax weights into the superposition
and does not weight the family's output; as the operation ends in a BatchNorm without affine
parameters, that output is then blind to the family's total weight. Normalizing inside and
weighting outside keeps the relaxation the DARTS one.) The genotype is derived from the
candidates' own architecture weights, as for separate candidates.

``EntangledConvLayer`` is the layer of the macro space (``bilevel.nas.macro``), which entangles
widths as well: a narrower layer is the first channels of the widest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from bilevel.nas.ops import conv_op

__all__ = ["ENTANGLED_FAMILIES", "EntangledConvLayer", "EntangledConvOp", "centre_masks", "entangled_groups", "width_factors"]

ENTANGLED_FAMILIES: dict[str, tuple[str, int]] = {
    "sep_conv_3x3": ("sep_conv", 3),
    "sep_conv_5x5": ("sep_conv", 5),
    "dil_conv_3x3": ("dil_conv", 3),
    "dil_conv_5x5": ("dil_conv", 5),
    "conv_1x1": ("conv", 1),
    "conv_3x3": ("conv", 3),
    "sharp_sep_conv_3x3": ("sharp_sep_conv", 3),
    "sharp_sep_conv_5x5": ("sharp_sep_conv", 5),
    "sharp_dil_conv_3x3": ("sharp_dil_conv", 3),
    "sharp_dil_conv_5x5": ("sharp_dil_conv", 5),
}
"""Convolutional operation -> (family, kernel size): the candidates that can share one weight."""


def entangled_groups(ops: Sequence[str]) -> dict[str, list[str]]:
    """Families with at least two members among ``ops`` -> their members, smallest kernel first."""
    families: dict[str, list[str]] = {}
    for name in ops:
        if name in ENTANGLED_FAMILIES:
            families.setdefault(ENTANGLED_FAMILIES[name][0], []).append(name)
    return {f: sorted(m, key=lambda n: ENTANGLED_FAMILIES[n][1]) for f, m in families.items() if len(m) > 1}


def centre_masks(kernels: Sequence[int], largest: int, like: Tensor) -> Tensor:
    """(len(kernels), K, K): mask i is 1 on the centred k_i x k_i square of a K x K kernel."""
    masks = []
    for k in kernels:
        if k > largest or (largest - k) % 2:
            raise ValueError(f"a {k}x{k} kernel has no centre in a {largest}x{largest} one (sizes must be odd and at most {largest})")
        pad = (largest - k) // 2
        masks.append(nnf.pad(torch.ones(k, k, dtype=like.dtype, device=like.device), (pad, pad, pad, pad)))
    return torch.stack(masks)


def _run_masked(module: nn.Module, x: Tensor, mask: Tensor, kernel: int) -> Tensor:
    """``module(x)`` with every kernel x kernel convolution's weight multiplied by ``mask``."""
    if isinstance(module, nn.Sequential):
        for child in module:
            x = _run_masked(child, x, mask, kernel)
        return x
    if isinstance(module, nn.Conv2d) and module.kernel_size == (kernel, kernel):
        return nnf.conv2d(x, module.weight * mask, module.bias, module.stride, module.padding, module.dilation, module.groups)
    return module(x)


class EntangledConvOp(nn.Module):
    """The members of one family as one operation at the largest kernel; ``forward(x, u)`` with
    weights u over the members (``names`` order) superposes their kernels."""

    def __init__(self, names: Sequence[str], channels: int, stride: int, affine: bool, search: bool):
        super().__init__()
        self.names = list(names)
        self.kernels = [ENTANGLED_FAMILIES[n][1] for n in self.names]
        self.largest = max(self.kernels)
        self.op = conv_op(self.names[self.kernels.index(self.largest)], channels, stride, affine, search)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        masks = centre_masks(self.kernels, self.largest, x)
        mask = (weights.reshape(-1, 1, 1).to(masks) * masks).sum(0)
        return _run_masked(self.op, x, mask, self.largest)


def width_factors(weights: Tensor, widths: Sequence[int], largest: int) -> Tensor:
    """(largest,): a_o = sum_c q_c [o < c], the weight of output channel o when width c keeps the
    first c channels of the widest layer."""
    channel = torch.arange(largest, device=weights.device).reshape(1, -1)
    keeps = (channel < torch.tensor(list(widths), device=weights.device).reshape(-1, 1)).to(weights.dtype)
    return (weights.reshape(-1, 1) * keeps).sum(0)


class EntangledConvLayer(nn.Module):
    """A macro layer whose (kernel, width) candidates are slices of one weight W of the largest
    kernel K and width C (TangleNAS's superposed convolution):

        out = ReLU(BN(conv(x, W (.) sum_k p_k m_k))) (.) a(q),      a_o = sum_c q_c [o < c],

    p over ``kernels``, q over ``widths``. The kernel candidates are superposed in the weight
    (exact at a one-hot p); the width candidates are the first c channels of the output, and as
    BatchNorm and ReLU act channel by channel, out is exactly sum_c q_c (candidate of width c,
    zero-padded to C). Parameters: one C x C_in x K x K convolution."""

    def __init__(self, c_in: int, kernels: Sequence[int], widths: Sequence[int], affine: bool = False):
        super().__init__()
        self.kernels, self.widths = list(kernels), list(widths)
        self.largest_kernel, self.largest_width = max(self.kernels), max(self.widths)
        self.conv = nn.Conv2d(c_in, self.largest_width, self.largest_kernel, padding=self.largest_kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(self.largest_width, affine=affine)

    def forward(self, x: Tensor, kernel_weights: Tensor, width_weights: Tensor) -> Tensor:
        mask = (kernel_weights.reshape(-1, 1, 1).to(x) * centre_masks(self.kernels, self.largest_kernel, x)).sum(0)
        out = nnf.conv2d(x, self.conv.weight * mask, None, 1, self.largest_kernel // 2)
        out = nnf.relu(self.bn(out))
        return out * width_factors(width_weights.to(x), self.widths, self.largest_width).reshape(1, -1, 1, 1)
