"""Detect host synchronization: what makes a computation impossible to capture in a CUDA graph
and slow on a GPU even without one.

A host sync is any operation whose result the host must wait for: reading a tensor's value
(``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, Python branching on a tensor), operations
whose output shape depends on values (``nonzero``, boolean-mask indexing, ``unique``,
``masked_select``) and copies to the host. On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
catches all of them. On any device, :func:`forbid_host_sync` also intercepts them at the ATen
level (a ``TorchDispatchMode``), so a CPU test fails where a GPU run would synchronize."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "forbid_host_sync"]

_aten = torch.ops.aten


class HostSyncError(RuntimeError):
    """An operation that synchronizes the host with the device ran where none is allowed."""


def _sync_ops() -> frozenset[Any]:
    names = [
        "_local_scalar_dense",  # .item(), float(t), int(t), bool(t), .tolist(), Python `if t:`
        "is_nonzero",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "equal",
        "allclose",
    ]
    ops = set()
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            ops.update(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


_SYNC_OPS = _sync_ops()
_BOOL_INDEX_OPS = frozenset(
    getattr(packet, overload)
    for packet in (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_)
    for overload in packet.overloads()
)
_COPY_OPS = frozenset(
    getattr(packet, overload) for packet in (_aten._to_copy, _aten.copy_) for overload in packet.overloads()
)


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


def _is_device_to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func in (_aten.copy_.default,):
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    src = args[0] if args else None
    target = kwargs.get("device")
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


class _SyncDetector(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            raise HostSyncError(f"host synchronization ({func}) inside a region that must stay on the device")
        if func in _BOOL_INDEX_OPS and _has_bool_index(args):
            raise HostSyncError(f"boolean-mask indexing ({func}) inside a region that must stay on the device:"
                                " its output shape depends on the values (use torch.where or a multiplicative mask)")
        if func in _COPY_OPS and _is_device_to_host(func, args, kwargs):
            raise HostSyncError(f"copy to the host ({func}) inside a region that must stay on the device")
        return func(*args, **kwargs)


# reads of host-visible memory that never reach ATen on a CPU tensor (on CUDA they copy to the
# host first, which the ATen-level detector sees)
_HOST_READS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__})


class _HostReadDetector(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _HOST_READS:
            raise HostSyncError(f"host read ({func.__name__}) inside a region that must stay on the device")
        return func(*args, **(kwargs or {}))


@contextmanager
def forbid_host_sync(cuda: bool | None = None, aten: bool = True) -> Iterator[None]:
    """Raise :class:`HostSyncError` (or, from CUDA's sync debug mode, a RuntimeError) on any
    host synchronization inside the block.

    ``cuda``: arm ``torch.cuda.set_sync_debug_mode("error")`` (default: when CUDA is
    initialized). ``aten``: intercept synchronizing operations at the ATen level, on any device;
    it slows the block down (every operation passes through Python) and torch.compile'd code
    does not run under it, so use it in tests and in CPU warm-ups."""
    arm_cuda = torch.cuda.is_available() and torch.cuda.is_initialized() if cuda is None else cuda
    previous = torch.cuda.get_sync_debug_mode() if arm_cuda else None
    if arm_cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with (_HostReadDetector() if aten else nullcontext()), (_SyncDetector() if aten else nullcontext()):
            yield
    finally:
        if arm_cuda:
            torch.cuda.set_sync_debug_mode(previous)
