"""The outer loop: resume after SIGKILL gives the same result, checkpoints are atomic, the
NaN/inf guard stops with a clear message and keeps the last good checkpoint."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bilevel.runtime import atomic as ckpt
from bilevel.runtime.callbacks import MetricsWriter
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


CHECKPOINT_ROWS = 2**21  # 16 MB of float64 per version: one write takes tens of milliseconds


def _write_versions(directory: str, first: int) -> None:
    """Save versions first, first + 1, ... of a large checkpoint, one after the other, until killed."""
    torch.set_num_threads(1)  # a forked child stays out of the parent's thread pools
    x = torch.empty(CHECKPOINT_ROWS, dtype=torch.float64)
    for version in itertools.count(first):
        ckpt.save_checkpoint(Path(directory), {"version": version, "x": [x.fill_(float(version))]})


def test_sigkill_while_writing_checkpoints_leaves_a_complete_latest_one(tmp_path: Path) -> None:
    """A writer process SIGKILLed at random moments while it saves one large checkpoint after
    another: the latest checkpoint always loads with weights_only=True, is one complete version
    and never older than before the kill; the next write removes what the killed writers left."""
    fork = multiprocessing.get_context("fork")  # a real process, started in milliseconds
    moments = random.Random(int.from_bytes(os.urandom(4), "little"))
    latest, killed_mid_write = -1, 0
    for _ in range(8):
        writer = fork.Process(target=_write_versions, args=(str(tmp_path), latest + 1), daemon=True)
        writer.start()
        time.sleep(moments.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        killed_mid_write += any(tmp_path.glob(".checkpoint.pt.*.tmp"))
        if latest < 0 and not (tmp_path / "checkpoint.pt").exists():
            continue  # killed before its first write finished
        saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert saved["version"] >= latest
        assert saved["x"][0].shape == (CHECKPOINT_ROWS,) and bool((saved["x"][0] == saved["version"]).all())
        latest = saved["version"]
    assert killed_mid_write > 0, "no kill landed inside a write"
    ckpt.save_checkpoint(tmp_path, {"version": latest + 1, "x": [torch.zeros(1)]})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_temporaries_of_killed_writers_are_removed_on_write_and_resume(tmp_path: Path) -> None:
    """Only temporary files of the same target whose writer no longer runs are removed."""
    ckpt.save_checkpoint(tmp_path, {"step": 1})
    ended = subprocess.Popen(["true"])
    ended.wait()  # its process id no longer runs
    running = subprocess.Popen(["sleep", "60"])
    try:
        stale = tmp_path / f".checkpoint.pt.{ended.pid}.x1y2z3.tmp"
        busy = tmp_path / f".checkpoint.pt.{running.pid}.a1b2c3.tmp"  # a writer still at work
        other = tmp_path / f".result.json.{ended.pid}.q1r2s3.tmp"  # another target's
        for path in (stale, busy, other):
            path.write_bytes(b"torn")
        assert ckpt.load_checkpoint(tmp_path)["step"] == 1  # resume
        assert not stale.exists() and busy.exists() and other.exists()
        stale.write_bytes(b"torn")
        ckpt.save_checkpoint(tmp_path, {"step": 2})  # the next write
        assert not stale.exists() and busy.exists() and other.exists()
        ckpt.atomic_write_json(tmp_path / "result.json", {"steps": 2})
        assert not other.exists() and busy.exists()
    finally:
        running.kill()
        running.wait()


def test_metrics_are_cut_back_atomically_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming drops the records past the checkpoint's step through the atomic writer: a
    rewrite that dies midway leaves metrics.jsonl as it was, and no temporary file."""
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": k, "upper_loss": 1.0 / k}) for k in range(1, 6)]
    original = "".join(r + "\n" for r in records) + '{"step": 6, "upper_lo'  # torn by a killed run
    path.write_text(original)

    def dies(fd: int) -> None:  # the process dies before the new file is complete
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "fsync", dies)
    with pytest.raises(KeyboardInterrupt):
        MetricsWriter(path, resume_from_step=3)
    monkeypatch.undo()
    assert path.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]

    writer = MetricsWriter(path, resume_from_step=3)
    writer.write({"step": 4, "upper_loss": 0.5})
    writer.close()
    assert path.read_text().splitlines() == [*records[:3], json.dumps({"step": 4, "upper_loss": 0.5})]


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


def test_a_checkpoint_of_the_untyped_engine_state_resumes_to_the_same_result(tmp_path: Path) -> None:
    """Checkpoints written before engine states were typed (format 1: the engine's own tensors
    under "extra", no "format" key) resume exactly; the fields of another engine are refused."""
    from bilevel.engines import BORepConfig, ImplicitState

    spec = quadratic_spec(inner_steps=20, steps=6, checkpoint_every=3)
    data = spec.model_dump(mode="json")
    data["levels"]["upper"]["solver"] = {"name": "normalized_momentum", "lr": 0.05}
    from bilevel.spec import spec_from_data

    loaded = spec_from_data(data)
    reference = run(loaded, engine=BORepConfig(), out=tmp_path / "ref", progress=False)
    stopped = tmp_path / "old"
    run(spec_from_data({**data, "run": {**data["run"], "steps": 3}}), engine=BORepConfig(), out=stopped, progress=False)
    state = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert state.pop("format") == 2
    engine_state = state["engine_state"]
    state["engine_state"] = {"lower": engine_state["lower"], "inner_state": engine_state["inner_state"],
                             "extra": {"z": engine_state["z"]}, "step": engine_state["step"]}
    ckpt.save_checkpoint(stopped, state)
    resumed = run(loaded, engine=BORepConfig(), out=stopped, resume=True, progress=False)
    assert resumed.result["upper_variables"] == reference.result["upper_variables"]
    assert resumed.result["final_upper_loss"] == reference.result["final_upper_loss"]
    with pytest.raises(ValueError, match="fields z, which ImplicitState does not declare"):
        ImplicitState.from_state_dict({"lower": [], "inner_state": [], "extra": {"z": [torch.zeros(1)]}, "step": 1})
