"""Capture a function of tensors once, replay it for new input values (CUDA graphs).

A CUDA graph records the kernels a function launches, with their arguments and memory
addresses, and replays them with one launch (``torch.cuda.CUDAGraph``). Replaying is exact (the
same kernels on the same addresses) and removes the per-kernel launch and Python cost, which is
what bounds small and medium hypergradients. It requires:

* static inputs: the function reads its inputs from buffers allocated before capture; a call
  copies the new values into them (:class:`CapturedCall` does);
* static outputs: the replay writes into the tensors the capture produced; a call returns copies;
* no host synchronization and no data-dependent Python control flow inside (the Python code runs
  once, at capture; whatever it decides is baked in);
* autograd is allowed: backward kernels are captured like any other.

Before capturing, the function runs once eagerly on a side stream (lazy initializations, cuBLAS
workspaces, autograd's device threads happen outside the capture) under
:func:`~bilevel.fastpath.host_sync.forbid_host_sync`; after capturing, one replay is compared with
that eager run, and a mismatch beyond rounding aborts the fast path.

:class:`ReplayBackend` gives the same contract on any device by re-executing the function at
each replay into the captured output tensors, with the Python-side state frozen at capture: the
tests use it to check the buffer handling and the fallbacks of the fast path on CPU."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.fastpath.host_sync import forbid_host_sync

__all__ = ["CaptureMismatch", "CapturedCall", "CudaGraphBackend", "GraphBackend", "ReplayBackend", "signature"]

Flat = list[Tensor]


class CaptureMismatch(RuntimeError):
    """The replayed graph does not reproduce the eager result: the function depends on something
    other than its tensor inputs (host state, a value read at capture time)."""


class GraphBackend(Protocol):
    def warmup(self, fn: Callable[[], Flat]) -> Flat: ...

    def capture(self, fn: Callable[[], Flat]) -> Flat: ...

    def replay(self) -> None: ...


class CudaGraphBackend:
    """torch.cuda.CUDAGraph with its own side stream and memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graph = torch.cuda.CUDAGraph()
        self.stream = torch.cuda.Stream(device)

    def warmup(self, fn: Callable[[], Flat]) -> Flat:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        # CUDA's own sync detection (the ATen-level one would also intercept compiled code)
        with torch.cuda.stream(self.stream), forbid_host_sync(cuda=True, aten=False):
            out = fn()
        current.wait_stream(self.stream)
        return [t.clone() for t in out]

    def capture(self, fn: Callable[[], Flat]) -> Flat:
        torch.cuda.synchronize(self.device)
        # autograd runs backward kernels from its device thread: errors for unsafe calls are
        # raised for the capturing thread only ("thread_local"); a sync anywhere still
        # invalidates the capture, which then fails
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class ReplayBackend:
    """Reference semantics of a captured graph without a GPU: each replay re-runs the function
    and writes its outputs into the tensors returned at capture (outputs stay static). Python
    state is whatever the function closes over, frozen as at capture, exactly as a graph bakes it."""

    def __init__(self, device: torch.device | None = None):
        self.fn: Callable[[], Flat] | None = None
        self.outputs: Flat = []

    def warmup(self, fn: Callable[[], Flat]) -> Flat:
        with forbid_host_sync():
            out = fn()
        return [t.clone() for t in out]

    def capture(self, fn: Callable[[], Flat]) -> Flat:
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self) -> None:
        assert self.fn is not None
        fresh = self.fn()
        with torch.no_grad():
            for static, value in zip(self.outputs, fresh):
                if static is not value:
                    static.copy_(value)


def signature(tree: Any) -> Hashable:
    """What must match for a captured graph to serve new inputs: the structure, and each
    tensor's shape, dtype and device; other leaves by value."""
    leaves, spec = pytree.tree_flatten(tree)
    parts: list[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            parts.append(("T", tuple(leaf.shape), leaf.dtype, str(leaf.device), leaf.layout))
        else:
            try:
                hash(leaf)
                parts.append(("V", leaf))
            except TypeError:
                parts.append(("R", repr(leaf)))
    return tuple(parts)


def _relative_gap(a: Flat, b: Flat) -> float:
    worst = 0.0
    for u, v in zip(a, b):
        if not (u.is_floating_point() or u.is_complex()):
            if not torch.equal(u, v):
                return float("inf")
            continue
        scale = float(torch.linalg.vector_norm(v.double()))
        gap = float(torch.linalg.vector_norm((u.double() - v.double())))
        if gap != gap:  # nan on either side
            if not (torch.isnan(u).equal(torch.isnan(v))):
                return float("inf")
            continue
        worst = max(worst, gap / scale if scale > 0 else gap)
    return worst


class CapturedCall:
    """``fn(*args)`` captured for the shapes of ``args``; call it with new args of the same
    signature to replay. ``fn`` returns a pytree of tensors (and Python values, which are frozen).

    Input tensors are copied into static buffers before each replay, skipping a copy when the
    same tensor, unmodified since the last copy, is passed again (persistent data); outputs are
    returned as copies, so a caller may keep them across calls."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        backend: GraphBackend,
        tolerance: float = 1e-5,
    ):
        leaves, self._in_spec = pytree.tree_flatten(tuple(args))
        self._tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        self._static = [leaf.detach().clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        self._sources: dict[int, tuple[weakref.ref[Tensor], int]] = {}  # slot -> (tensor, version) copied in
        self.signature = signature(tuple(args))
        static_args = pytree.tree_unflatten(self._static, self._in_spec)
        self._out_spec: Any = None
        self._out_leaves: list[Any] = []

        def flat_call() -> Flat:
            out_leaves, self._out_spec = pytree.tree_flatten(fn(*static_args))
            self._out_leaves = out_leaves
            return [leaf for leaf in out_leaves if isinstance(leaf, Tensor)]

        self._backend = backend
        versions = [self._static[slot]._version for slot in self._tensor_slots]
        eager = backend.warmup(flat_call)
        # a function that writes into its inputs changes the static buffers at every replay:
        # then every call copies all inputs in again
        self._may_skip = versions == [self._static[slot]._version for slot in self._tensor_slots]
        self._outputs = backend.capture(flat_call)
        self._template = list(self._out_leaves)
        backend.replay()
        gap = _relative_gap(self._outputs, eager)
        if not gap <= tolerance:
            raise CaptureMismatch(f"the replayed graph differs from the eager run (relative gap {gap:.3g} > {tolerance:g})")

    def __call__(self, *args: Any) -> Any:
        leaves, spec = pytree.tree_flatten(tuple(args))
        if spec != self._in_spec:
            raise ValueError("CapturedCall called with arguments of another structure than at capture")
        with torch.no_grad():
            for slot in self._tensor_slots:
                value = leaves[slot]
                seen = self._sources.get(slot)
                if self._may_skip and seen is not None and seen[0]() is value and seen[1] == value._version:
                    continue
                self._static[slot].copy_(value)
                self._sources[slot] = (weakref.ref(value), value._version)
        self._backend.replay()
        outputs = iter(t.clone() for t in self._outputs)
        rebuilt = [next(outputs) if isinstance(leaf, Tensor) else leaf for leaf in self._template]
        return pytree.tree_unflatten(rebuilt, self._out_spec)
