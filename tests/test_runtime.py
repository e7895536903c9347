"""The outer loop: resume after SIGKILL gives the same result, checkpoints are atomic, the
NaN/inf guard stops with a clear message and keeps the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bilevel.runtime import checkpoint as ckpt
from bilevel.runtime.loop import DivergenceError, run
from bilevel.spec import load_spec
from problems.toy import quadratic_data, quadratic_hypergrad, quadratic_spec

HERE = Path(__file__).parent


def _write_spec(tmp_path: Path, steps: int, delay: float, outer_lr: float = 0.1, name: str = "spec.yaml") -> Path:
    data = quadratic_spec(inner_steps=50, steps=steps, checkpoint_every=1).model_dump(mode="json")
    module = str((HERE / "runtime_data" / "slow_quadratic.py").resolve())
    data["levels"]["upper"]["objective"] = f"{module}:upper"
    data["levels"]["upper"]["objective_kwargs"] = {"delay": delay, "rho": 0.1}
    data["levels"]["upper"]["solver"] = {"name": "momentum", "lr": outer_lr}
    data["levels"]["lower"]["objective"] = f"{module}:lower"
    data["levels"]["lower"]["solver"]["warm_start"] = True
    data["levels"]["lower"]["solver"]["steps"] = 30
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, timeout=120)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path, steps=40, delay=0.02)
    reference = _cli("run", str(spec), "--out", str(tmp_path / "ref"), "-q")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bilevel", "run", str(spec), "--out", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    kill_after = 7 + int.from_bytes(os.urandom(1), "little") % 20  # a random step in [7, 26]
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists(), "the run finished before it could be killed"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < saved["step"] < 40

    resumed = _cli("run", str(spec), "--out", str(out), "-q", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stderr
    a = json.loads((tmp_path / "ref" / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert a["upper_variables"] == b["upper_variables"]
    assert a["final_upper_loss"] == b["final_upper_loss"]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    ref_records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["upper_loss"] for r in records] == [r["upper_loss"] for r in ref_records]


def test_interrupted_checkpoint_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"step": 3, "x": [torch.ones(4)]}
    ckpt.save_checkpoint(tmp_path, good)

    def torn_save(obj, handle):  # writes half a file, then the process "dies"
        handle.write(b"\x80\x02garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, {"step": 4, "x": [torch.zeros(4)]})
    monkeypatch.undo()
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded["step"] == 3 and torch.equal(loaded["x"][0], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "temporary files must be cleaned up"


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path, steps=3, delay=0.0)
    run(load_spec(spec), out=tmp_path / "out", progress=False)
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and len(state["x"]) == 1


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path, steps=200, delay=0.0, outer_lr=50.0)
    out = tmp_path / "out"
    with pytest.raises(DivergenceError) as info:
        run(load_spec(spec), out=out, progress=False)
    assert "not finite" in str(info.value) and "checkpoint" in str(info.value)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == info.value.step - 1
    assert all(torch.isfinite(t).all() for t in saved["x"])

    cli = _cli("run", str(spec), "--out", str(tmp_path / "cli"), "-q")
    assert cli.returncode == 3
    assert "diverged" in cli.stderr and "Traceback" not in cli.stderr


def test_resume_refuses_a_different_spec(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path, steps=2, delay=0.0)
    run(load_spec(spec), out=tmp_path / "out", progress=False)
    other = _write_spec(tmp_path, steps=2, delay=0.0, outer_lr=0.2, name="other.yaml")
    cli = _cli("run", str(other), "--out", str(tmp_path / "out"), "-q", "--resume")
    assert cli.returncode == 2 and "different spec" in cli.stderr


def test_run_descends_toward_the_closed_form_optimum(tmp_path: Path) -> None:
    """Gradient descent with the implicit hypergradient drives the closed-form dF/dx to ~0."""
    spec = quadratic_spec(inner_steps=100, steps=200)
    data = spec.model_dump(mode="json")
    # the hyper-objective's Hessian has eigenvalues in [0.34, 8.8]: lr 0.2 contracts by 0.93 per step
    data["levels"]["upper"]["solver"] = {"name": "sgd", "lr": 0.2}
    data["levels"]["lower"]["solver"]["warm_start"] = True
    from bilevel.spec import spec_from_data

    result = run(spec_from_data(data), out=tmp_path, progress=False)
    x = result.x[0]
    start = torch.as_tensor(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["hypergrad_norm"])
    final = quadratic_hypergrad(x, quadratic_data()).norm()
    assert final < 1e-5 * float(start)
