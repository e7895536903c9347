"""The GPU fast path: the same hypergradient, executed with fewer launches, fused kernels or
reduced precision (see docs/fastpath.md).

* :mod:`~bilevel.fastpath.graph`: capture a function of tensors in a CUDA graph, replay it;
* :mod:`~bilevel.fastpath.compiled`: the first-order inner loop through ``torch.compile``;
* :mod:`~bilevel.fastpath.precision`: TF32 / bf16 scopes and the agreement check;
* :mod:`~bilevel.fastpath.host_sync`: detect host synchronization (tests, warm-ups);
* :mod:`~bilevel.fastpath.accelerator`: the per-engine policy that picks among them;
* :mod:`~bilevel.fastpath.accelerated`: any engine wrapped so that it runs through that policy."""

from __future__ import annotations

from bilevel.fastpath.accelerator import FastPath, set_graph_backend
from bilevel.fastpath.accelerated import Accelerated, accelerated
from bilevel.fastpath.graph import CapturedCall, CaptureMismatch, CudaGraphBackend, ReplayBackend
from bilevel.fastpath.precision import agreement, precision_scope
from bilevel.fastpath.host_sync import HostSyncError, forbid_host_sync

__all__ = [
    "Accelerated",
    "CaptureMismatch",
    "CapturedCall",
    "CudaGraphBackend",
    "FastPath",
    "HostSyncError",
    "ReplayBackend",
    "accelerated",
    "agreement",
    "forbid_host_sync",
    "precision_scope",
    "set_graph_backend",
]
