"""The architecture-search benchmark scripts run (tiny settings; slow: run with -m slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_comparison_script(tmp_path: Path) -> None:
    payload = _script("nas_digits").main(["--methods", "DARTS 1st order", "RARTS", "--seeds", "1", "--random", "2", "--steps", "3",
                    "--out", str(tmp_path), "--figure", str(tmp_path / "cell.png")])
    assert [row["method"] for row in payload["summary"]] == ["DARTS 1st order", "RARTS"]
    assert len(payload["random"]["nas/digits"]["cells"]) == 2 and (tmp_path / "cell.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["genotype"]["normal"]


@pytest.mark.slow
def test_gpu_measurement_script_runs_on_cpu(tmp_path: Path) -> None:
    rows = _script("nas_gpu").main(["--steps", "1", "--warmup", "1", "--device", "cpu", "--small", "--out", str(tmp_path / "gpu.json")])
    assert [row["config"] for row in rows][:2] == ["DARTS 2nd order", "DARTS 2nd order, PC (K=4)"]
    assert all(row["time_per_epoch_s"] > 0 for row in rows)


@pytest.mark.slow
def test_digits_script_without_random_cells_compares_nothing(tmp_path: Path, capsys) -> None:
    payload = _script("nas_digits").main(["--methods", "DARTS 1st order", "--seeds", "1", "--random", "0", "--steps", "2",
                                          "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert payload["summary"][0]["beats_random_mean"] is None and payload["random"]["nas/digits"]["mean"] is None
    assert "nan" not in printed and "beats the random mean" not in printed and "no random cells drawn" in printed
