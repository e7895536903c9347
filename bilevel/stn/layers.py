"""STN layers: hidden units gated by the hyperparameters (MacKay et al. 2019, "Self-Tuning Networks:
Bilevel Optimization of Hyperparameters using Structured Best-Response Functions", ICLR, Sec. 4.2).

A layer's weights are a best-response approximation w_phi(lam) that is affine in the conditioning
vector h = code(lam) (the unconstrained hyperparameters, ``bilevel.stn.hyper_input``), with the
structure that keeps it cheap: each output unit scales one extra weight row by a scalar,

    StnLinear:  out = W_elem x + b_elem + s_w(h) * (W_hyper x) + s_b(h) * b_hyper,   [s_w, s_b] = V h
    StnConv2d:  the same with convolutions, s_w and s_b scaling whole output channels
    StnTensor:  out = t_elem + s(h) * t_hyper,  s = V h             (a tensor variable that responds)

V is a bias-free linear map from the n_hyper entries of h to 2 scalars per output unit (one for
StnTensor). Compared with a plain layer it doubles the weights and adds n_hyper x 2 x units for V.
The paper motivates the structure with two-layer linear networks, whose exact best response to a
regularizer rescales hidden units; elsewhere it is a local model of the best response around the
current hyperparameters. V starts at zero, so an untrained STN is the plain network, and the
response is learned from the perturbations.

``h`` is a 1-D tensor (one setting for the whole batch) or (batch, n_hyper) (one per example)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

__all__ = ["StnConv2d", "StnLayer", "StnLinear", "StnTensor"]


class StnLayer(nn.Module):
    """Base of the layers whose weights respond to the hyperparameters; the planner recognises an
    STN model (a best-response approximation) by containing one."""

    n_hyper: int

    def _scales(self, h: Tensor, units: int) -> Tensor:
        """V h: (units * k,) for a 1-D h, (batch, units * k) for a 2-D one; checks h's width."""
        if h.shape[-1] != self.n_hyper or h.dim() not in (1, 2):
            raise ValueError(
                f"{type(self).__name__} was built for a conditioning vector of {self.n_hyper} entries (n_hyper), got"
                f" shape {list(h.shape)}: bilevel.stn.hyper_input(upper) encodes each continuous hyperparameter"
                " entry as 1 number, an integer as 1, a categorical as one per choice (plain tensors: their size)"
            )
        return nnf.linear(h.to(self.hyper_map.weight.dtype), self.hyper_map.weight)

    def extra_repr(self) -> str:
        return f"n_hyper={self.n_hyper}"


class StnLinear(StnLayer):
    """out = W_elem x + b_elem + s_w(h) * (W_hyper x) + s_b(h) * b_hyper, [s_w, s_b] = V h."""

    def __init__(self, in_features: int, out_features: int, n_hyper: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.n_hyper = in_features, out_features, n_hyper
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.hyper_weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
            self.hyper_bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
            self.register_parameter("hyper_bias", None)
        self.hyper_map = nn.Linear(n_hyper, (2 if bias else 1) * out_features, bias=False)
        nn.init.zeros_(self.hyper_map.weight)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        scales = self._scales(h, self.out_features)
        s_w = scales[..., : self.out_features]
        out = nnf.linear(x, self.weight, self.bias) + s_w * nnf.linear(x, self.hyper_weight)
        if self.hyper_bias is not None:
            out = out + scales[..., self.out_features :] * self.hyper_bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, n_hyper={self.n_hyper}, bias={self.bias is not None}"


class StnConv2d(StnLayer):
    """A 2-d convolution whose output channels are gated like StnLinear's units:
    out = conv(x; W_elem, b_elem) + s_w(h)[c] * conv(x; W_hyper) + s_b(h)[c] * b_hyper."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        n_hyper: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
    ):
        super().__init__()
        self.elem = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.hyper = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.out_channels, self.n_hyper = out_channels, n_hyper
        self.hyper_bias = nn.Parameter(torch.zeros(out_channels).uniform_(-0.1, 0.1)) if bias else None
        self.hyper_map = nn.Linear(n_hyper, (2 if bias else 1) * out_channels, bias=False)
        nn.init.zeros_(self.hyper_map.weight)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        scales = self._scales(h, self.out_channels)
        if scales.dim() == 1:
            scales = scales.expand(x.shape[0], -1)
        s_w = scales[:, : self.out_channels, None, None]
        out = self.elem(x) + s_w * self.hyper(x)
        if self.hyper_bias is not None:
            out = out + scales[:, self.out_channels :, None, None] * self.hyper_bias[:, None, None]
        return out


class StnTensor(StnLayer):
    """A tensor that responds to the hyperparameters: t(h) = t_elem + (V h) * t_hyper, i.e. an
    affine best response t_elem + diag(t_hyper) V h. Call it with h: ``lower["w"](h)``."""

    def __init__(self, shape: Sequence[int], n_hyper: int, init: float = 0.0):
        super().__init__()
        self.shape, self.n_hyper = tuple(shape), n_hyper
        self.value = nn.Parameter(torch.full(self.shape, float(init)))
        self.hyper_value = nn.Parameter(torch.ones(self.shape))
        numel = math.prod(self.shape)
        self.hyper_map = nn.Linear(n_hyper, numel, bias=False)
        nn.init.zeros_(self.hyper_map.weight)

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() != 1:
            raise ValueError(f"StnTensor takes a 1-D conditioning vector, got shape {list(h.shape)}")
        return self.value + self._scales(h, 1).reshape(self.shape) * self.hyper_value

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, n_hyper={self.n_hyper}"
