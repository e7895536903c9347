"""The command line under hostile use: --engine applied before --set, --allow-imports on the
command line, a full disk named with its path, and `bilevel report` on metrics with garbage lines."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.runtime import atomic
from bilevel.runtime.loop import run
from bilevel.spec import SpecError, load_spec

HERE = Path(__file__).parent
GOOD = HERE / "specs" / "good.yaml"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, timeout=180, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})


def test_engine_is_applied_before_set_so_set_refines_it() -> None:
    """good.yaml declares no engine: --engine implicit gives the kind, --set its linear solver."""
    cli = _cli("hypergrad", str(GOOD), "--engine", "implicit", "--set", "engine.linear_solver.method=neumann",
               "--set", "engine.linear_solver.maxiter=7")
    assert cli.returncode == 0, cli.stderr
    assert "engine: implicit" in cli.stdout and "hvp_count 8" in cli.stdout  # 7 Neumann terms (and its first product), not the default 100
    wrong = _cli("hypergrad", str(GOOD), "--engine", "unrolled", "--set", "engine.linear_solver.method=cg")
    assert wrong.returncode == 2 and "engine.linear_solver" in wrong.stderr and "Traceback" not in wrong.stderr
    unknown = _cli("plan", str(GOOD), "--engine", "nosuch")
    assert unknown.returncode == 2 and "unknown engine 'nosuch'" in unknown.stderr


def test_allow_imports_lists_the_references_and_refuses_before_importing(tmp_path: Path) -> None:
    shutil.copy(HERE / "specs" / "user_objectives.py", tmp_path / "user_objectives.py")
    marker = tmp_path / "ran"
    spec = GOOD.read_text().replace("data: {source: user_objectives.py:data}\n    solver: {name: sgd, lr: 0.1}\n",
                                    f"data: {{source: 'os:system', kwargs: {{command: 'touch {marker}'}}}}\n"
                                    "    solver: {name: sgd, lr: 0.1}\n", 1)
    assert "os:system" in spec
    (tmp_path / "hostile.yaml").write_text(spec)
    cli = _cli("--allow-imports", "numpy", "validate", str(tmp_path / "hostile.yaml"))
    assert cli.returncode == 2, cli.stderr
    assert "imports: levels.upper.data.source: os:system" in cli.stderr
    assert "levels.upper.data.source: module 'os' is not allowed by --allow-imports" in cli.stderr
    assert not marker.exists()
    (tmp_path / "good.yaml").write_text(GOOD.read_text())
    fine = _cli("--allow-imports", "", "validate", str(tmp_path / "good.yaml"))
    assert fine.returncode == 0 and "valid" in fine.stdout, fine.stderr


def test_a_full_disk_is_reported_with_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(SpecError) as caught:
        run(load_spec(GOOD), out=tmp_path / "out", progress=False)
    (issue,) = caught.value.issues
    assert issue.file.startswith(str(tmp_path / "out")) and "No space left on device" in issue.message


def test_report_skips_and_names_metrics_lines_that_are_not_records(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(load_spec(GOOD), out=out, progress=False)
    metrics = out / "metrics.jsonl"
    good = metrics.read_bytes().splitlines()
    garbage = [b"\xff\xfe\x00 not json", b"[1, 2, 3]", b'{"step": "two"}', b'{"step": 3, "upper": 5}', b"{" * 5000]
    metrics.write_bytes(b"\n".join([good[0], *garbage, good[1], b'{"step": 4, "upper_loss": "x'  ]) + b"\n")
    cli = _cli("report", str(out), "--out", str(tmp_path / "report"))
    assert cli.returncode == 0, cli.stderr
    assert "Traceback" not in cli.stderr
    assert f"warning: {metrics}: 6 line(s) are not metrics records and were skipped (line 2, 3, 4, 5, 6, ...)" in cli.stderr
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]
    assert len(rows) == 1
