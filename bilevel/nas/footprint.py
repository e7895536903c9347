"""Measured memory of a supernet: its parameters and the peak memory of one training step.

The peak is what one forward and backward pass of the cross-entropy allocates above what was
allocated before it (activations kept for the backward pass, gradients, temporaries), measured,
not estimated: on CPU from the allocation and free events that ``torch.profiler`` records with
``profile_memory=True`` (their running sum, in time order, at its maximum), on CUDA by
``torch.cuda.max_memory_allocated``. It compares supernets of one search space built two ways,
e.g. weight-entangled against one weight per candidate (``bilevel.nas.entangled``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

__all__ = ["parameter_count", "peak_step_bytes", "supernet_footprint"]


def parameter_count(module: nn.Module) -> int:
    """Scalars in the module's parameters."""
    return sum(p.numel() for p in module.parameters())


def _allocation_peak(result: Any) -> int:
    """Largest running sum of the allocation sizes (frees are negative) in a profiler result."""
    from torch._C._profiler import _EventType

    sizes: list[tuple[int, int]] = []
    stack = list(result.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(sizes):
        running += size
        peak = max(peak, running)
    return peak


def peak_step_bytes(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``step()`` runs, above the allocations alive when it starts."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return _allocation_peak(prof.profiler.kineto_results)


def supernet_footprint(net: nn.Module, weights: Mapping[str, Tensor], x: Tensor, y: Tensor) -> dict[str, int]:
    """Parameters of ``net`` and the peak bytes of one training step on (x, y) with the mixture
    ``weights``: forward, cross-entropy, backward into the weights' gradients (freed first)."""
    net.zero_grad(set_to_none=True)
    net.train()

    def step() -> None:
        loss = nnf.cross_entropy(net(x, weights), y)
        loss.backward()

    peak = peak_step_bytes(step, x.device)
    net.zero_grad(set_to_none=True)
    return {"parameters": parameter_count(net), "peak_step_bytes": peak}
