"""Run settings: device, precision, seed, outer steps, outputs and budget."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from bilevel.spec._base import SpecModel

__all__ = ["BudgetSpec", "DistributedSpec", "RunSpec"]


class BudgetSpec(SpecModel):
    """Resources the planner may assume."""

    memory_mb: Annotated[float, Field(gt=0)] | None = None
    """Memory available for one hypergradient (MiB); None: the device's free memory, or 4096 on CPU."""


class DistributedSpec(SpecModel):
    """Data-parallel runs over torch.distributed, launched by torchrun (see docs/howto/torchrun.md).
    Without torchrun (or with one process) these settings are ignored."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: auto picks nccl when the run's device is cuda, gloo on cpu."""
    timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    """How long a rank waits in a collective for the others before the run fails (seconds)."""


class RunSpec(SpecModel):
    """How the outer loop runs and where it writes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating-point precision of variables and data."""
    seed: int = 0
    """Seed for initialization, data sampling and anything random in the problem."""
    steps: Annotated[int, Field(ge=0)] = 100
    """Outer (upper-level) steps."""
    out: Annotated[str, Field(min_length=1)] = "runs/{name}"
    """Output directory (relative to the working directory); `{name}` stands for the spec's name, so
    that two problems run without an `out` do not share a directory."""
    checkpoint_every: Annotated[int, Field(ge=1)] | None = 10
    """Write an atomic checkpoint every N outer steps (None: only at the end)."""
    log_every: Annotated[int, Field(ge=1)] = 1
    """Append a metrics.jsonl record every N outer steps."""
    monitor_every: Annotated[int, Field(ge=1)] = 10
    """Call the spec's monitor function every N outer steps (and after the last one)."""
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    """Resources the planner may assume."""
    tensorboard: bool = False
    """Also log the metrics (and the monitor's values) as TensorBoard scalars under out/tensorboard
    (needs the tensorboard package: the `tensorboard` extra)."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Data-parallel settings, used when the run is launched by torchrun with several processes."""
