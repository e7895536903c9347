"""Candidate operations of the search spaces, by name.

Convolutional operations follow DARTS (Liu et al. 2019): every parametric operation is
ReLU -> convolution(s) -> BatchNorm; separable convolutions apply a depthwise-separable block
twice; dilated convolutions once with dilation 2; ``skip_connect`` is the identity, or a
factorized reduction (two offset 1x1 stride-2 convolutions) on stride-2 edges; ``none`` is zero.
In the supernet BatchNorm has no affine parameters (``affine=False``) and pooling is followed by
a BatchNorm, as in DARTS's search network; derived networks use affine BatchNorm.

SharpSepConv (Hundt, Jain & Hager 2019, "sharpDARTS: Faster and More Accurate Differentiable
Architecture Search", section 3.1; ``ahundt/sharpDARTS``, ``cnn/operations.py``) replaces the two
stacked separable blocks of DARTS's sep_conv by one block with a nonlinearity in the middle:

    ReLU -> depthwise k x k (stride, dilation) -> pointwise C -> C_mid -> BN -> ReLU
         -> depthwise k x k (stride 1, not dilated) -> pointwise C_mid -> C -> BN,

C_mid = C (the official default, ``C_mid_mult=1``). ``sharp_sep_conv_KxK`` is undilated,
``sharp_dil_conv_KxK`` dilates the first depthwise convolution by 2 (the official code maps its
sep_conv and dil_conv names to these).

MLP operations act on feature vectors of a fixed width: linear maps with or without an
activation, bare activations, the identity and zero."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["CONV_OPS", "MLP_OPS", "FactorizedReduce", "ReLUConvBN", "SharpSepConv", "Zero", "conv_op", "mlp_op"]


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output's shape."""

    def __init__(self, stride: int = 1):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1 or x.dim() < 4:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv2d -> BatchNorm2d."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise conv (dilated) -> pointwise conv -> BatchNorm2d."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two depthwise-separable blocks (the first with the stride)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1, affine),
            DilConv(c_in, c_out, kernel, 1, padding, 1, affine),
        )


class SharpSepConv(nn.Sequential):
    """The sharpDARTS separable convolution: one depthwise-separable block, a BN-ReLU, and a second
    depthwise (stride 1, undilated) and pointwise convolution; ``mid`` channels in between."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                 affine: bool = True, mid: int | None = None):
        mid = mid or c_out
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, mid, 1, bias=False),
            nn.BatchNorm2d(mid, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, mid, kernel, 1, (kernel - 1) // 2, groups=mid, bias=False),
            nn.Conv2d(mid, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convolutions, one offset by a pixel, concatenated."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels (got {c_out})")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = x[:, :, 1:, 1:] if x.shape[-1] > 1 else x
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def _pool(kind: str, channels: int, stride: int, affine: bool, search: bool) -> nn.Module:
    pool = nn.MaxPool2d(3, stride=stride, padding=1) if kind == "max" else nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    return nn.Sequential(pool, nn.BatchNorm2d(channels, affine=False)) if search else pool


ConvFactory = Callable[[int, int, bool, bool], nn.Module]

CONV_OPS: dict[str, ConvFactory] = {
    "none": lambda c, stride, affine, search: Zero(stride),
    "skip_connect": lambda c, stride, affine, search: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "max_pool_3x3": lambda c, stride, affine, search: _pool("max", c, stride, affine, search),
    "avg_pool_3x3": lambda c, stride, affine, search: _pool("avg", c, stride, affine, search),
    "sep_conv_3x3": lambda c, stride, affine, search: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine, search: SepConv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine, search: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine, search: DilConv(c, c, 5, stride, 4, 2, affine),
    "conv_1x1": lambda c, stride, affine, search: ReLUConvBN(c, c, 1, stride, 0, affine),
    "conv_3x3": lambda c, stride, affine, search: ReLUConvBN(c, c, 3, stride, 1, affine),
    "sharp_sep_conv_3x3": lambda c, stride, affine, search: SharpSepConv(c, c, 3, stride, 1, 1, affine),
    "sharp_sep_conv_5x5": lambda c, stride, affine, search: SharpSepConv(c, c, 5, stride, 2, 1, affine),
    "sharp_dil_conv_3x3": lambda c, stride, affine, search: SharpSepConv(c, c, 3, stride, 2, 2, affine),
    "sharp_dil_conv_5x5": lambda c, stride, affine, search: SharpSepConv(c, c, 5, stride, 4, 2, affine),
}
"""name -> factory(channels, stride, affine, search) of a convolutional operation."""


MlpFactory = Callable[[int], nn.Module]

MLP_OPS: dict[str, MlpFactory] = {
    "none": lambda width: Zero(),
    "skip_connect": lambda width: nn.Identity(),
    "linear": lambda width: nn.Linear(width, width),
    "linear_relu": lambda width: nn.Sequential(nn.Linear(width, width), nn.ReLU()),
    "linear_tanh": lambda width: nn.Sequential(nn.Linear(width, width), nn.Tanh()),
    "linear_sigmoid": lambda width: nn.Sequential(nn.Linear(width, width), nn.Sigmoid()),
    "relu": lambda width: nn.ReLU(),
    "tanh": lambda width: nn.Tanh(),
}
"""name -> factory(width) of an operation on feature vectors."""


def conv_op(name: str, channels: int, stride: int, affine: bool, search: bool) -> nn.Module:
    """The convolutional operation ``name`` on ``channels`` channels."""
    return CONV_OPS[name](channels, stride, affine, search)


def mlp_op(name: str, width: int) -> nn.Module:
    """The feature-vector operation ``name`` on ``width`` features."""
    return MLP_OPS[name](width)
