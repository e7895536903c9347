"""The architecture-search benchmark scripts run (tiny settings; slow: run with -m slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


@pytest.mark.slow
def test_digits_script_compares_the_new_searches_within_their_spaces(tmp_path: Path) -> None:
    payload = _script("nas_digits").main(["--methods", "macro, entangled", "sharpDARTS, MaxW", "--seeds", "1", "--random", "1",
                                          "--steps", "2", "--retrain-as", "nas/digits", "--out", str(tmp_path)])
    assert [(row["method"], row["preset"]) for row in payload["summary"]] == [("macro, entangled", "nas/digits_macro"),
                                                                               ("sharpDARTS, MaxW", "nas/digits_sharpdarts")]
    assert set(payload["random"]) == {"nas/digits_macro", "nas/digits_sharpdarts"}
    for row in payload["runs"]:
        assert set(row["test_accuracy_by_protocol"]) == {row["preset"], "nas/digits"}
    assert "layers" in payload["runs"][0]["genotype"] and "normal" in payload["runs"][1]["genotype"]


@pytest.mark.slow
def test_digits_script_measures_the_entangled_supernets(tmp_path: Path) -> None:
    rows = _script("nas_digits").main(["--memory", "--out", str(tmp_path)])["memory"]
    by = {(r["preset"], r["mixed_op"]): r for r in rows}
    for preset in ("nas/digits_macro", "nas/digits_entangled"):
        entangled, separate = by[preset, "entangled"], by[preset, "separate"]
        assert entangled["parameters"] < separate["parameters"] and entangled["peak_step_bytes"] < separate["peak_step_bytes"]
