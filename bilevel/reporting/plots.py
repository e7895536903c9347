"""PNG plots overlaying several runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from bilevel.reporting.runs import RunRecord

__all__ = ["MAX_COMPONENTS", "SERIES", "plot_nested", "plot_series", "safe_name"]

SERIES: dict[str, tuple[str, bool]] = {
    "upper_loss": ("upper loss F(x, y)", False),
    "hypergrad_norm": ("hypergradient norm", True),
    "inner_residual": ("inner residual ||grad_y G||", True),
    "linear_residual": ("linear-solve residual (relative)", True),
}
"""metrics.jsonl key -> (title, log scale when every value is positive)."""

MAX_COMPONENTS = 20
"""A vector-valued trajectory shows at most this many of its entries."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(plt, n: int) -> list:
    """n distinct colors: the default cycle up to 10 runs, tab20 up to 20, then a sampled colormap."""
    if n <= 10:
        return plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cmap = plt.get_cmap("tab20" if n <= 20 else "viridis")
    return [cmap(i / max(n - 1, 1)) if n > 20 else cmap(i) for i in range(n)]


def _finish(fig, ax, n: int, path: Path) -> None:
    """Legend (outside the axes when there are many runs), layout, PNG."""
    if n > 6:
        fig.set_size_inches(8.4, 4.0)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def safe_name(name: str) -> str:
    """A file-name-safe version of a metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "value"


def plot_series(runs: Sequence[RunRecord], key: str, path: Path, title: str, log: bool) -> bool:
    """One line per run of a top-level metric against the outer step; False when no run has it."""
    plt = _pyplot()
    colors = _colors(plt, len(runs))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = []
    for index, run in enumerate(runs):
        steps, values = run.series(key)
        if steps:
            ax.plot(steps, values, label=run.label, linewidth=1.4, color=colors[index % len(colors)])
            drawn += values
    if not drawn:
        plt.close(fig)
        return False
    if log and min(drawn) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    _finish(fig, ax, len(runs), path)
    plt.close(fig)
    return True


def plot_nested(runs: Sequence[RunRecord], group: str, name: str, path: Path) -> bool:
    """Trajectories of record[group][name] (an upper variable or a monitor value), one color per
    run, one line per entry (the first MAX_COMPONENTS); False when no run has it."""
    plt = _pyplot()
    colors = _colors(plt, len(runs))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn, truncated = False, False
    for index, run in enumerate(runs):
        steps, vectors = run.nested(group, name)
        if not steps:
            continue
        width = min(len(v) for v in vectors)
        truncated |= width > MAX_COMPONENTS
        for component in range(min(width, MAX_COMPONENTS)):
            label = run.label if component == 0 else None
            ax.plot(steps, [v[component] for v in vectors], color=colors[index % len(colors)],
                    alpha=1.0 if width == 1 else 0.6, linewidth=1.2, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    what = "upper variable" if group == "upper" else "monitor"
    ax.set_title(f"{what}: {name}" + (f" (first {MAX_COMPONENTS} entries)" if truncated else ""))
    ax.set_xlabel("outer step")
    ax.set_ylabel(name)
    _finish(fig, ax, len(runs), path)
    plt.close(fig)
    return True
