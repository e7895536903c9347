"""Self-Tuning Networks: layers whose weights respond to the hyperparameters, and the helpers an
STN model's objectives call. The engine itself is ``bilevel.engines.stn`` (``kind: stn``)."""

from __future__ import annotations

from bilevel.stn.functional import dropout, hyper_input, hyper_size
from bilevel.stn.layers import StnConv2d, StnLayer, StnLinear, StnTensor

__all__ = ["StnConv2d", "StnLayer", "StnLinear", "StnTensor", "dropout", "hyper_input", "hyper_size"]
