"""What the image problems write into a run directory: PNG image grids and result tables
(Markdown for people, JSON for scripts); the Markdown tables the comparison and benchmark
scripts print, and the ``bilevel run`` command line of each run behind them."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["format_cell", "markdown_table", "mean_std", "run_command", "save_image_grid", "write_table"]


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std"} (sample standard deviation; 0 for one value)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0}


def save_image_grid(
    images: Tensor,
    path: str | Path,
    rows: int | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    signed: float | None = None,
) -> Path:
    """Save (N, C, H, W) images as one PNG grid, ``rows`` rows (default: about square).

    Pixel values are shown on [0, 1] (clipped); with ``signed=r`` they are perturbations shown on
    [-r, r] with a diverging color map (grayscale images only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().float().cpu()
    n = images.shape[0]
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    width = max(0.9 * cols + 0.6, 0.07 * len(title) if title else 0.0)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 0.9 * rows + (0.4 if title else 0.1)), squeeze=False)
    for index in range(rows * cols):
        ax = axes[index // cols][index % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if index >= n:
            continue
        image = images[index]
        if signed is not None:
            ax.imshow(image.mean(0).numpy(), cmap="RdBu_r", vmin=-signed, vmax=signed)
        elif image.shape[0] == 1:
            ax.imshow(image[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(image[:3].permute(1, 2, 0).clamp(0, 1).numpy())
        if row_labels is not None and index % cols == 0 and index // cols < len(row_labels):
            ax.set_ylabel(row_labels[index // cols], rotation=0, ha="right", va="center", fontsize=8)
        if col_labels is not None and index < cols and index < len(col_labels):
            ax.set_title(col_labels[index], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_cell(value: Any) -> str:
    """A table cell: {"mean", "std"} as mean ± std and floats with 3 decimals, anything else as str()."""
    if isinstance(value, Mapping) and {"mean", "std"} <= set(value):
        return f"{value['mean']:.3f} ± {value['std']:.3f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: the header row, the separator row and one line per row (cells as str())."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, stem: str, title: str | None = None) -> None:
    """Write ``stem.md`` (a Markdown table; {"mean", "std"} cells as mean ± std) and ``stem.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    table = markdown_table(columns, ([format_cell(row.get(c, "")) for c in columns] for row in rows))
    (out_dir / f"{stem}.md").write_text((f"# {title}\n\n" if title else "") + table + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(list(rows), indent=2) + "\n")


def run_command(preset: str, overrides: Sequence[str], engine: str | None = None, out: str | None = None) -> str:
    """The ``bilevel run`` command line that runs ``preset`` with the spec ``overrides`` (and
    ``--engine``, ``--out``): what a comparison script runs through the Python API
    (``bilevel.run(load_spec(find_preset(preset), overrides=overrides), engine=...)``), as a shell
    command that reproduces one row of its table."""
    words = ["bilevel", "run", preset]
    if engine is not None:
        words += ["--engine", engine]
    if out is not None:
        words += ["--out", out]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)
