"""Reduced precision for the inner solve and the Hessian-vector products, and its check.

* TF32 (CUDA): float32 matrix products run on TensorFloat-32 tensor cores (10-bit mantissa
  inputs, float32 accumulation). Set through ``torch.set_float32_matmul_precision("high")`` for
  the duration of the block and restored after it, so nothing leaks into user code.
* bf16: ``torch.autocast(device_type, dtype=torch.bfloat16)``: matrix products and convolutions
  run in bfloat16 (8-bit mantissa), reductions and the leaves stay in float32; gradients with
  respect to float32 leaves come back in float32 (CPU and CUDA).

The hypergradient g computed this way is compared with the full-precision one g32 by

    cosine = <g, g32> / (||g|| ||g32||),    rel_err = ||g - g32|| / ||g32||,

both over all upper variables together, as device tensors (read when logged)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from bilevel.linalg.tree import tree_dot, tree_norm, tree_sub

__all__ = ["agreement", "precision_scope"]


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def precision_scope(mode: str, device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """The context for ``mode`` ("full", "tf32", "bf16") on ``device``; a no-op where the mode
    does not apply (full precision, TF32 off CUDA, anything but float32 data)."""
    if mode == "full" or dtype != torch.float32:
        return contextlib.nullcontext()
    if mode == "tf32":
        return _tf32() if device.type == "cuda" else contextlib.nullcontext()
    if mode == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision mode {mode!r}")


def agreement(grad: Sequence[Tensor], reference: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(cosine, relative error) of ``grad`` against ``reference``, over all tensors together."""
    grad = tuple(g.float() if g.dtype != reference[0].dtype else g for g in grad)
    ref_norm = tree_norm(reference)
    tiny = torch.finfo(ref_norm.dtype).tiny
    cosine = tree_dot(grad, reference) / torch.clamp(tree_norm(grad) * ref_norm, min=tiny)
    rel = tree_norm(tree_sub(grad, reference)) / torch.clamp(ref_norm, min=tiny)
    return cosine.detach(), rel.detach()
