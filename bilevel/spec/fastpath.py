"""Execution options shared by the hypergradient engines: the fast path and reduced precision.

They change how a hypergradient is executed, never what it is: the fast path replays the same
kernels (CUDA graphs) or the same arithmetic compiled (torch.compile); reduced precision is
checked against the full-precision hypergradient and the agreement is reported."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from bilevel.spec._base import SpecModel

__all__ = ["FastPathMode", "PrecisionSpec"]

FastPathMode = Literal["auto", "off", "cuda_graph", "compile"]
"""auto | off | cuda_graph | compile (see docs/fastpath.md)."""


class PrecisionSpec(SpecModel):
    """Reduced precision for the inner solve and the Hessian-vector products, checked against
    the full-precision hypergradient every ``check_every`` calls."""

    mode: Literal["full", "tf32", "bf16"] = "full"
    """full: the run's dtype throughout. tf32: float32 matrix products on TensorFloat-32 tensor
    cores (CUDA only; set for the call and restored after it). bf16: torch.autocast to bfloat16
    around the inner solve and the Hessian-vector products (CPU and CUDA); the upper objective's
    gradients stay in full precision."""
    check_every: Annotated[int, Field(ge=1)] | None = 10
    """With tf32 or bf16: every N-th hypergradient is also computed in full precision, and the
    cosine and relative error between the two are reported in the stats (precision_cosine,
    precision_rel_err). None: never (no extra cost)."""
