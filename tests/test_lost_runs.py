"""Runs that must not be lost: another problem's run directory is left byte for byte, a directory
is held by one run at a time, SIGTERM and SIGINT stop between steps with a checkpoint that
resumes bit-identically, unreadable checkpoints are named without advice to unpickle them, and
user code that fails mid-run is named with its level, step and message (exit code 4)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bilevel.runtime.loop import run
from bilevel.spec import SpecError, load_spec
from problems.toy import quadratic_spec

HERE = Path(__file__).parent
SLOW = str((HERE / "runtime_data" / "slow_quadratic.py").resolve())
FAILING = str((HERE / "runtime_data" / "failing_objectives.py").resolve())


def _spec(tmp_path: Path, steps: int = 20, delay: float = 0.0, outer_lr: float = 0.1, name: str = "spec.yaml",
          upper: str = f"{SLOW}:upper", upper_kwargs: dict | None = None) -> Path:
    data = quadratic_spec(inner_steps=20, steps=steps, checkpoint_every=1).model_dump(mode="json")
    data["levels"]["upper"]["objective"] = upper
    data["levels"]["upper"]["objective_kwargs"] = upper_kwargs if upper_kwargs is not None else {"delay": delay, "rho": 0.1}
    data["levels"]["upper"]["solver"] = {"name": "momentum", "lr": outer_lr}
    data["levels"]["lower"]["objective"] = f"{SLOW}:lower"
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _wait_for_steps(metrics: Path, steps: int, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.01)
    raise AssertionError(f"{metrics} did not reach {steps} steps")


def test_a_run_of_another_problem_is_left_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(load_spec(_spec(tmp_path, steps=3)), out=out, progress=False)
    before = _digest(out)
    other = _spec(tmp_path, steps=3, outer_lr=0.2, name="other.yaml")
    for extra in ([], ["--resume"]):
        cli = _cli("run", str(other), "--out", str(out), "-q", *extra)
        assert cli.returncode == 2, cli.stderr
        assert "holds a run of a different spec" in cli.stderr and "--overwrite" in cli.stderr
        assert "Traceback" not in cli.stderr
        assert _digest(out) == before
    # the same spec reruns in place; --overwrite replaces the other run
    assert _cli("run", str(_spec(tmp_path, steps=3)), "--out", str(out), "-q").returncode == 0
    replaced = _cli("run", str(other), "--out", str(out), "-q", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    record = json.loads((out / "spec.json").read_text())
    assert record["spec"]["levels"]["upper"]["solver"]["lr"] == 0.2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_files_of_an_unidentified_run_are_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"name": "someone else\'s"}\n')
    with pytest.raises(SpecError, match="cannot be identified"):
        run(load_spec(_spec(tmp_path, steps=2)), out=out, progress=False)
    assert (out / "result.json").read_text() == '{"name": "someone else\'s"}\n'


def test_an_empty_output_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, steps=2)
    with pytest.raises(SpecError, match="working directory"):
        run(load_spec(spec), out="", progress=False)
    cli = _cli("run", str(spec), "--out", "", "-q")
    assert cli.returncode == 2 and "is empty" in cli.stderr and "Traceback" not in cli.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_second_run_on_a_busy_directory_is_refused_and_the_first_completes(tmp_path: Path) -> None:
    gate = tmp_path / "hold"  # the first run waits at its third step while this file exists
    gate.touch()
    spec = _spec(tmp_path, steps=10, upper=f"{FAILING}:gated_upper", upper_kwargs={"gate": str(gate), "after": 2})
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "bilevel", "run", str(spec), "--out", str(out), "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out / "metrics.jsonl", 1)
        second = _cli("run", str(spec), "--out", str(out), "-q")
    finally:
        gate.unlink()
    assert second.returncode == 2, second.stderr
    assert "is in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert first.wait(timeout=180) == 0, first.stderr.read()
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 10
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 11))
    assert _cli("run", str(spec), "--out", str(out), "-q").returncode == 0  # the lock went with the first run


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_between_steps_and_the_checkpoint_resumes_bit_identically(tmp_path: Path, signum: int,
                                                                                  code: int) -> None:
    spec = _spec(tmp_path, steps=30, delay=0.03)
    reference = _cli("run", str(spec), "--out", str(tmp_path / "ref"), "-q")
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "bilevel", "run", str(spec), "--out", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(out / "metrics.jsonl", 5)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == code
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and signal.Signals(signum).name in stderr and "--resume" in stderr
    result = json.loads((out / "result.json").read_text())
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert result["status"] == "interrupted" and result["steps"] == saved["step"] < 30
    resumed = _cli("run", str(spec), "--out", str(out), "-q", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert a["upper_variables"] == b["upper_variables"] and a["final_upper_loss"] == b["final_upper_loss"]
    losses = [json.loads(line)["upper_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(line)["upper_loss"] for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]


class _Foreign:
    """Pickled by the hostile checkpoint below: weights_only loading refuses it."""


@pytest.mark.parametrize("kind", ["empty", "truncated", "foreign", "hostile", "garbage"])
def test_an_unreadable_checkpoint_is_named_without_advice_to_unpickle_it(tmp_path: Path, kind: str) -> None:
    spec = _spec(tmp_path, steps=3)
    out = tmp_path / "out"
    run(load_spec(spec), out=out, progress=False)
    path = out / "checkpoint.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "foreign":
        torch.save({"weight": torch.ones(3)}, path)
    elif kind == "hostile":
        path.write_bytes(pickle.dumps({"step": _Foreign()}))
    else:
        path.write_bytes(os.urandom(2048))
    cli = _cli("run", str(spec), "--out", str(out), "-q", "--resume")
    assert cli.returncode == 2, cli.stderr
    assert f"{path}: (top level): is not a bilevel checkpoint (or is corrupted)" in cli.stderr
    assert "weights_only" not in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.parametrize(("mode", "expected"), [
    ("raise", "levels.upper.objective raised RuntimeError: the upper objective failed on call 8"),
    ("no_path", "levels.upper.objective returned a value with no gradient path to the variables"),
])
def test_user_code_failing_mid_run_is_named_with_its_step_and_keeps_the_checkpoint(tmp_path: Path, mode: str,
                                                                                   expected: str) -> None:
    spec = _spec(tmp_path, steps=20, upper=f"{FAILING}:upper", upper_kwargs={"mode": mode, "after": 7})
    out = tmp_path / "out"
    cli = _cli("run", str(spec), "--out", str(out), "-q")
    assert cli.returncode == 4, cli.stderr
    assert "Traceback" not in cli.stderr and expected in cli.stderr
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed" and expected in result["message"]
    assert f"outer step {saved['step'] + 1}:" in cli.stderr and str(out / "checkpoint.pt") in cli.stderr
    if mode == "raise":
        assert "failing_objectives.py:" in cli.stderr  # the user's own line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_ends_without_a_traceback(signum: int) -> None:
    """While the package and torch import (before any command runs) and during the command."""
    codes = []
    for delay in (0.3, 0.8, 1.5, 2.5):  # some land during imports, some during the command, on a loaded machine too
        proc = subprocess.Popen([sys.executable, "-m", "bilevel", "validate", str(HERE / "specs" / "good.yaml")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
        assert "Traceback" not in stderr, stderr
        codes.append(proc.returncode)
    expected = 130 if signum == signal.SIGINT else 143
    assert set(codes) <= {0, expected, -int(signum)} and expected in codes, codes
