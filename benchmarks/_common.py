"""What the benchmark scripts share: timing calls side by side (warm-up, then round-robin or
sequential timed calls, CUDA synchronized around each, medians and peak GPU memory), the name of
the device a figure was measured on, and writing the figures as JSON."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["device_name", "measure", "sync", "write_json"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that the clock reads what a call cost."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count (from /proc/cpuinfo; "cpu" where
    that is not available)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


def measure(
    calls: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    repeats: int,
    engines: dict[str, Any] | None = None,
    order: str = "round-robin",
) -> dict[str, dict[str, Any]]:
    """Per method: warm-up calls (the fast path captures here), with peak memory over them; then
    the timed calls. ``round-robin`` (CPU default) times one call of each method per round, so
    that the load of a shared machine falls on all alike; ``sequential`` (GPU default) times each
    method in turn and then frees what it holds (captured graphs of one method would otherwise
    sit in memory while the next one runs: two full unrolls of size L do not fit in 80 GB).

    Returns name -> {"value" (what the last warm-up call returned), "peak_mib" (GPU only, else
    None), "warmup_s", "times_ms", "median_ms"}."""
    out: dict[str, dict[str, Any]] = {}

    def warm(name: str, call: Callable[[], Any]) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        started = time.perf_counter()
        value = None
        for _ in range(warmup):
            value = call()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        out[name] = {"value": value, "peak_mib": peak, "warmup_s": time.perf_counter() - started, "times_ms": []}

    def timed(name: str, call: Callable[[], Any]) -> None:
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        out[name]["times_ms"].append(1000 * (time.perf_counter() - started))

    if order == "sequential":
        for name, call in calls.items():
            warm(name, call)
            for _ in range(repeats):
                timed(name, call)
            engine = (engines or {}).get(name)
            if engine is not None:
                engine.fast.release()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        for name, call in calls.items():
            warm(name, call)
        for _ in range(repeats):
            for name, call in calls.items():
                timed(name, call)
    for result in out.values():
        result["median_ms"] = statistics.median(result["times_ms"]) if result["times_ms"] else None
    return out


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON (a trailing newline), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
