"""The functions a NAS spec refers to: the objective of both levels, the monitor and the report.

    levels.*.objective: bilevel.nas:supernet_loss   # cross-entropy of net(x, arch weights)
    monitor: bilevel.nas:monitor                    # genotype JSON + softmaxed alphas, every run.monitor_every steps
    report: bilevel.nas:report                      # final genotype, cell drawing, alpha plot, retrain

The monitor writes ``genotypes/step-NNNNNN.json`` and ``genotype.json`` (the latest) into the run
directory and logs the softmaxed architecture weights into metrics.jsonl; the report writes the
final ``genotype.json``, ``cell.png`` (the derived cells, or the layers of a macro architecture),
``alphas.png`` (their history) and, when the architecture declares ``retrain``, ``retrain.json``
(the derived network trained from scratch). Cell and macro spaces alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from bilevel.nas.draw import draw_architecture, plot_alpha_history
from bilevel.nas.genotype import derive_architecture
from bilevel.nas.supernet import ArchitectureWeights
from bilevel.runtime.atomic import atomic_write_json

__all__ = ["genotype_record", "monitor", "report", "supernet_loss"]


def supernet_loss(upper: Any, lower: Any, batch: dict[str, Tensor], net: str = "net", arch: str = "arch") -> Tensor:
    """Cross-entropy of the supernet ``lower[net]`` under the mixture weights of ``upper[arch]``:
    the training loss when used downstairs, the validation loss upstairs."""
    return nnf.cross_entropy(lower[net](batch["x"], upper[arch]()), batch["y"])


def _weights(upper: Any, arch: str) -> ArchitectureWeights:
    weights = upper[arch]()
    if not isinstance(weights, ArchitectureWeights):
        raise TypeError(f"upper[{arch!r}] is not an architecture variable ({{kind: architecture, ...}})")
    return weights


def genotype_record(genotype: Any, weights: ArchitectureWeights, step: int | None) -> dict[str, Any]:
    """What a genotype file holds: the genotype, the architecture's spec (search space and retrain
    settings, so that `bilevel retrain` needs nothing else) and the spec's directory."""
    return {
        "step": step,
        "genotype": genotype.to_json(),
        "skip_connections": {t: genotype.skip_count(t) for t in genotype.cells},
        "architecture": weights.spec.model_dump(mode="json"),
        "base_dir": str(weights.base_dir),
    }


def monitor(upper: Any, lower: Any, *, step: int, out_dir: Path, arch: str = "arch") -> dict[str, Any]:
    """Derive the genotype at this step and write it; log the softmaxed architecture weights."""
    weights = _weights(upper, arch)
    genotype = derive_architecture(weights, weights.space)
    record = genotype_record(genotype, weights, step)
    atomic_write_json(Path(out_dir) / "genotypes" / f"step-{step:06d}.json", record)
    atomic_write_json(Path(out_dir) / "genotype.json", record)
    values: dict[str, Any] = {}
    if weights.space.kind == "macro":
        return {"alpha_kernel": weights["kernel"].detach().cpu(), "alpha_width": weights["width"].detach().cpu()}
    for cell_type in weights.space.cell_types:
        values[f"alpha_{cell_type}"] = weights[cell_type].detach().cpu()
        if f"edge_{cell_type}" in weights:
            values[f"beta_{cell_type}"] = weights[f"edge_{cell_type}"].detach().cpu()
        values[f"skip_{cell_type}"] = genotype.skip_count(cell_type)
    return values


def report(upper: Any, lower: Any, *, out_dir: Path | None = None, arch: str = "arch", retrain: bool = True) -> dict[str, Any]:
    """The final genotype (genotype.json), its drawing (cell.png), the alpha history (alphas.png)
    and, when the architecture declares ``retrain`` (and ``retrain`` is true), the derived network
    trained from scratch: test accuracy, parameters, time (retrain.json)."""
    weights = _weights(upper, arch)
    genotype = derive_architecture(weights, weights.space)
    out: dict[str, Any] = {f"skip_connections_{t}": genotype.skip_count(t) for t in genotype.cells}
    if weights.space.kind == "macro":
        out["architecture"] = genotype.to_json()["layers"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "genotype.json", genotype_record(genotype, weights, None))
        draw_architecture(genotype, weights.space, out_dir / "cell.png")
        if (out_dir / "metrics.jsonl").exists():
            plot_alpha_history(out_dir / "metrics.jsonl", weights.space, out_dir / "alphas.png")
    if retrain and weights.spec.retrain is not None:
        from bilevel.nas.retrain import retrain as train_derived

        first = next(iter(weights.values()))
        result = train_derived(genotype, weights.spec, base_dir=weights.base_dir, device=first.device,
                               dtype=first.dtype if first.is_floating_point() else torch.float32)
        if out_dir is not None:
            atomic_write_json(out_dir / "retrain.json", {"genotype": genotype.to_json(), **result})
        out.update({"test_accuracy": result["test_accuracy"], "test_accuracy_std": result["test_accuracy_std"],
                    "retrain_params": result["params"], "retrain_time_s": result["time_s"]})
    return out
