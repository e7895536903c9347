"""Differentiable architecture search: search spaces as networkx cells (or macro chains of layers
choosing kernel sizes and widths), the supernet of mixed operations (weight-entangled or one weight
per candidate), genotypes derived from the architecture, drawing and retraining them, the measured
memory of a supernet, and the run hooks (objective, monitor, report) that NAS specs refer to
("bilevel.nas:supernet_loss", ...).

Submodules are imported on first use, so that the spec can validate cells (search_space needs only
networkx) without building any network."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Architecture",
    "ArchitectureWeights",
    "Genotype",
    "MacroArchitecture",
    "MacroGenotype",
    "MacroSupernet",
    "Supernet",
    "derive_genotype",
    "draw_genotype",
    "monitor",
    "random_genotype",
    "report",
    "retrain",
    "supernet_footprint",
    "supernet_loss",
]

_WHERE = {
    "Architecture": "bilevel.nas.supernet",
    "ArchitectureWeights": "bilevel.nas.supernet",
    "Supernet": "bilevel.nas.supernet",
    "MacroArchitecture": "bilevel.nas.macro",
    "MacroGenotype": "bilevel.nas.macro",
    "MacroSupernet": "bilevel.nas.macro",
    "supernet_footprint": "bilevel.nas.footprint",
    "Genotype": "bilevel.nas.genotype",
    "derive_genotype": "bilevel.nas.genotype",
    "random_genotype": "bilevel.nas.genotype",
    "draw_genotype": "bilevel.nas.draw",
    "retrain": "bilevel.nas.retrain",
    "monitor": "bilevel.nas.hooks",
    "report": "bilevel.nas.hooks",
    "supernet_loss": "bilevel.nas.hooks",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bilevel.nas' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
