"""Train a derived architecture from scratch and report its test accuracy.

The derived network has the search network's skeleton (stem, cells, classifier) with each kept
edge one operation (affine BatchNorm), optionally with other channels / cells than the search
(DARTS searches with 8 cells of 16 channels and retrains 20 cells of 36). Training: SGD with
momentum, weight decay, a learning-rate schedule over all steps (``RetrainSpec.schedule``: cosine
from ``lr`` to 0 by default, or sharpDARTS's cosine power annealing with a warm-up), shuffled
minibatches from a seeded generator; test accuracy in eval mode (BatchNorm running statistics).
A macro architecture (``bilevel.nas.macro``) trains the same way as its chain of layers."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf
from pydantic import ValidationError
from torch import Tensor, nn

from bilevel.nas.genotype import Genotype, architecture_from_json, check_architecture
from bilevel.nas.network import CellNetwork
from bilevel.nas.ops import conv_op, mlp_op
from bilevel.refs import RefError, resolve_ref
from bilevel.schedules import scheduled_value
from bilevel.spec.errors import SpecError, SpecIssue
from bilevel.spec.search_space import ArchitectureVariable, RetrainSpec

__all__ = ["RETRAINS_DIR", "DerivedNetwork", "FixedOp", "derived_network", "load_genotype_file", "retrain", "retrain_run"]

RETRAINS_DIR = "retrains"
"""The folder of a run directory where `bilevel retrain` writes retrain-001.json, retrain-002.json, ..."""


class FixedOp(nn.Module):
    """One operation on an edge of a derived cell (ignores the mixture weights argument)."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.op(x)


class DerivedNetwork(CellNetwork):
    """The discrete network of a genotype in a search space."""

    def __init__(self, space: Any, genotype: Genotype, channels: int | None = None, cells: int | None = None):
        missing = [t for t in space.cell_types if t not in genotype.cells]
        if missing:
            raise ValueError(f"the genotype has no {', '.join(missing)} cell, which the search space needs")

        def make_edge(cell_type: str, src: int, dst: int, width: int, stride: int) -> nn.Module:
            name = genotype.op(cell_type, src, dst)
            op = conv_op(name, width, stride, affine=True, search=False) if space.kind == "conv" else mlp_op(name, width)
            return FixedOp(op)

        edges = {t: genotype.edges(t) for t in genotype.cells}
        edges.setdefault("reduce", edges["normal"])
        super().__init__(space, edges, make_edge, affine=True, channels=channels, cells=cells)


def derived_network(space: Any, genotype: Any, channels: int | None = None, cells: int | None = None) -> nn.Module:
    """The network of a discrete architecture: a DerivedNetwork of cells, or a MacroNetwork (whose
    layers and widths the architecture fixes: ``channels`` and ``cells`` must be None)."""
    if space.kind == "macro":
        from bilevel.nas.macro import MacroNetwork

        given = [name for name, value in (("channels", channels), ("cells", cells)) if value is not None]
        if given:
            raise ValueError(f"retrain.{given[0]} resizes a cell network; a macro architecture fixes its layers and widths")
        return MacroNetwork(space, genotype)
    return DerivedNetwork(space, genotype, channels, cells)


def _load_data(settings: RetrainSpec, base_dir: Path) -> dict[str, dict[str, Tensor]]:
    source = resolve_ref(settings.data, base_dir)
    data = source(**settings.data_kwargs)
    for split in ("train", "test"):
        part = data.get(split) if isinstance(data, Mapping) else None
        if not isinstance(part, Mapping) or not {"x", "y"} <= set(part):
            raise ValueError(f"{settings.data} must return {{'train': {{'x', 'y'}}, 'test': {{'x', 'y'}}}}; {split!r} is missing or incomplete")
    return data


def _accuracy(net: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            correct += int((net(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum())
    net.train()
    return correct / max(x.shape[0], 1)


def retrain(
    genotype: Any,
    spec: ArchitectureVariable,
    settings: RetrainSpec | None = None,
    base_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Train ``genotype`` (a cell Genotype or a MacroGenotype) from scratch with ``settings`` (default: the spec's ``retrain``),
    ``settings.repeats`` times, and return the mean test accuracy, its standard deviation, each
    run's accuracy, the parameter count and the time."""
    settings = settings or spec.retrain
    if settings is None:
        raise ValueError("no retrain settings: declare retrain: {data: ...} in the architecture variable")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    data = _load_data(settings, base)
    device = torch.device(device)
    splits = {
        name: (data[name]["x"].to(device, dtype), data[name]["y"].to(device).long()) for name in ("train", "test")
    }
    runs = [_train_once(genotype, spec, settings, settings.seed + r, splits, device, dtype) for r in range(settings.repeats)]
    accuracies = [r["test_accuracy"] for r in runs]
    mean = sum(accuracies) / len(accuracies)
    spread = (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5 if len(accuracies) > 1 else 0.0
    return {
        "test_accuracy": mean,
        "test_accuracy_std": spread,
        "test_accuracies": accuracies,
        "train_accuracy": sum(r["train_accuracy"] for r in runs) / len(runs),
        "final_train_loss": runs[-1]["final_train_loss"],
        "params": runs[0]["params"],
        "epochs": settings.epochs,
        "steps": runs[0]["steps"],
        "time_s": sum(r["time_s"] for r in runs),
        "settings": settings.model_dump(mode="json"),
    }


def _train_once(
    genotype: Any,
    spec: ArchitectureVariable,
    settings: RetrainSpec,
    seed: int,
    splits: dict[str, tuple[Tensor, Tensor]],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    torch.manual_seed(seed)
    net = derived_network(spec.space, genotype, settings.channels, settings.cells).to(device, dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    per_epoch = max(1, math.ceil(n / settings.batch_size))
    total = settings.epochs * per_epoch
    began = time.perf_counter()
    step = 0
    loss = torch.zeros((), device=device)
    net.train()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, settings.batch_size):
            index = order[start : start + settings.batch_size]
            if index.numel() < 2:  # BatchNorm needs two examples
                continue
            for group in optimizer.param_groups:  # the decay ends one step after the last: lr > 0 throughout by default
                group["lr"] = scheduled_value(settings.lr, step, total + 1, settings.schedule, settings.final_lr_ratio,
                                              settings.power_base, settings.warmup_epochs * per_epoch)
            loss = nnf.cross_entropy(net(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimizer.step()
            step += 1
    elapsed = time.perf_counter() - began
    return {
        "test_accuracy": _accuracy(net, x_test, y_test),
        "train_accuracy": _accuracy(net, x_train, y_train),
        "final_train_loss": float(loss.detach()),
        "params": sum(p.numel() for p in net.parameters()),
        "steps": step,
        "time_s": elapsed,
    }


def load_genotype_file(path: Path, architecture_from: Path | None = None) -> tuple[Any, ArchitectureVariable, Path]:
    """A genotype file: the genotype, the architecture variable's spec (its search space and
    retrain settings), and the spec's directory.

    A file the NAS monitor or report wrote carries the architecture ({"genotype": ...,
    "architecture": ..., "base_dir": ...}). A hand-written file may hold the genotype alone, as
    {"genotype": {"normal": [[op, source, destination], ...], ...}} or just {"normal": [...], ...};
    the architecture then comes from ``architecture_from`` (a search run's genotype.json). The
    genotype is checked against the search space (``check_genotype``)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise SpecError.single(str(path), "", "not a genotype file (expected a JSON object)")
    source, run_data = path, data
    if "architecture" not in data:
        if architecture_from is None or not architecture_from.exists():
            where = f"; {architecture_from} does not exist" if architecture_from is not None else ""
            raise SpecError.single(str(path), "", "a genotype without an architecture key takes its search space and retrain"
                                   f" settings from a search run's genotype.json{where}")
        run = _read_json(architecture_from)
        if not isinstance(run, dict) or "architecture" not in run:
            raise SpecError.single(str(architecture_from), "", "not a genotype file of a search run (no architecture key)")
        source, run_data = architecture_from, run
    try:
        spec = ArchitectureVariable.model_validate(run_data["architecture"])
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SpecError.single(str(source), "architecture." + ".".join(map(str, first["loc"])), first["msg"]) from None
    try:
        genotype = architecture_from_json(data, spec.space)
    except (AttributeError, KeyError, TypeError, ValueError):
        expected = ('{"layers": [[kernel, width], ...]}' if spec.space.kind == "macro"
                    else "cell type -> list of [operation, source, destination]")
        raise SpecError.single(str(path), "genotype", f"expected {expected}") from None
    problem = check_architecture(genotype, spec.space)
    if problem is not None:
        raise SpecError.single(str(path), ".".join(p for p in ("genotype", problem[0]) if p), problem[1])
    return genotype, spec, Path(run_data.get("base_dir") or source.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise SpecError.single(str(path), "", f"cannot read the genotype file: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise SpecError([SpecIssue(str(path), "", f"invalid JSON: {exc.msg}", exc.lineno)]) from None


def retrain_run(
    run_dir: str | Path,
    step: int | None = None,
    genotype_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Retrain the genotype of a search run (the last one, the one of ``step``, or the one in
    ``genotype_file``, which may be hand-written: see ``load_genotype_file``) with the
    architecture's retrain settings updated by ``overrides`` (what `bilevel retrain` does).

    Each call writes a new file, ``RUN_DIR/retrains/retrain-NNN.json`` (the first free number),
    and never replaces one: not the search's own ``retrain.json``, nor an earlier retraining.
    Returns the file's contents (the genotype file, the step, the settings, the accuracies) with
    its path under ``"file"``."""
    run_dir = Path(run_dir)
    if genotype_file is not None:
        path = Path(genotype_file)
    elif step is not None:
        path = run_dir / "genotypes" / f"step-{step:06d}.json"
    else:
        path = run_dir / "genotype.json"
    if not path.exists():
        hint = " (the NAS monitor writes genotypes/step-N.json every run.monitor_every steps)" if step is not None else ""
        raise SpecError.single(str(path), "", f"no such genotype file{hint}")
    genotype, spec, base_dir = load_genotype_file(path, architecture_from=run_dir / "genotype.json")
    if spec.retrain is None:
        raise SpecError.single(str(path), "architecture.retrain", "the architecture declares no retrain settings"
                               " (add retrain: {data: ...} to the architecture variable)")
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        settings = RetrainSpec.model_validate({**spec.retrain.model_dump(), **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SpecError.single("--" + str(first["loc"][0]).replace("_", "-"), "retrain." + ".".join(map(str, first["loc"])), first["msg"]) from None
    if spec.space.kind == "macro":
        for name in ("channels", "cells"):
            if getattr(settings, name) is not None:
                raise SpecError.single(f"--{name}", f"retrain.{name}", "resizes a cell network; a macro architecture fixes"
                                       " its layers and widths (the search chose them)")
    try:
        from bilevel.compile import resolve_device

        result = retrain(genotype, spec, settings, base_dir, resolve_device(device or "auto"))
    except RefError as exc:
        raise SpecError.single(str(path), "architecture.retrain.data", str(exc)) from None
    result = {"genotype_file": str(path), "step": step, "genotype": genotype.to_json(), **result}
    from bilevel.runtime.atomic import write_new_json

    written = write_new_json(run_dir / RETRAINS_DIR, "retrain", result)
    return {**result, "file": str(written)}
