"""The user-defined problem outside the package runs through the CLI exactly as the how-to says,
from any working directory; the generated spec reference is up to date."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "custom_problem" / "spec.yaml"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_custom_problem_validates_plans_and_runs_from_elsewhere(tmp_path: Path) -> None:
    assert _cli("validate", str(SPEC), cwd=tmp_path).returncode == 0
    plan = json.loads(_cli("plan", str(SPEC), "--json", cwd=tmp_path).stdout)
    assert plan["engine"] == "implicit" and plan["reasons"]
    hyper = _cli("hypergrad", str(SPEC), "--json", cwd=tmp_path)
    payload = json.loads(hyper.stdout)
    assert payload["engine"] == "implicit" and len(payload["hypergradient"]["a"]) == 3
    out = tmp_path / "run"
    result = _cli("run", str(SPEC), "--out", str(out), "-q", "--set", "run.steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "result.json").read_text())
    assert written["steps"] == 5 and "balanced_val_accuracy" in written["report"]


def test_spec_reference_is_up_to_date() -> None:
    check = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_spec_reference.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
