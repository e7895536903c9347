"""Data-parallel runs on 2 gloo processes (CPU): the hypergradient (or search direction) of each
engine in runtime_data/distributed_cases.CASES on sharded data equals the single-process one on
the union of the shards (float64); runs, resume and exits under torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from bilevel import SpecError, load_spec, run
from runtime_data import distributed_cases as cases

WORLD = 2
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case computed on 2 spawned gloo ranks (one launch for the whole module)."""
    tmp = tmp_path_factory.mktemp("ranks")
    ranks = mp.spawn(cases.worker, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.time() + 600
    while not ranks.join(timeout=1):  # raises when a rank fails
        if time.time() > deadline:  # a rank waiting in a collective the other never enters
            for process in ranks.processes:
                process.terminate()
            pytest.fail("the ranks did not finish within 600 s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    return cases.all_cases()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", list(cases.CASES))
def test_distributed_hypergradient_equals_single_process(name: str, two_ranks: list[dict], single: dict) -> None:
    reference = single[name]
    for key in ("grad", "loss", "residual", "lower", "extra"):
        for call, expected in enumerate(reference[key]):
            got = two_ranks[0]["cases"][name][key][call]
            assert _rel(got, expected) < 1e-6, f"{name} {key} call {call}: relative error {_rel(got, expected):.2e}"
            # replicated: every rank holds bit-identical values
            assert torch.equal(got, two_ranks[1]["cases"][name][key][call]), f"{name} {key}: ranks differ"


def test_each_rank_draws_minibatches_from_its_own_shard(two_ranks: list[dict]) -> None:
    first, second = (set(r["indices"]) for r in two_ranks)
    assert first <= set(range(0, 16)) and second <= set(range(16, 31))
    assert len(first) == 16 and len(second) == 12  # an epoch of 4 batches of 4 / 3 batches of 4 (15 rows)


def test_a_closed_form_lower_level_over_sharded_data_is_refused(two_ranks: list[dict]) -> None:
    message = two_ranks[0]["closed_form_error"]
    assert "levels.lower.solution" in message and "shard" in message


def test_a_chain_of_levels_is_refused_in_a_data_parallel_run(two_ranks: list[dict]) -> None:
    message = two_ranks[0]["chain_error"]
    assert "levels" in message and "one process" in message


def test_replicas_that_differ_between_ranks_are_reported_not_checkpointed(two_ranks: list[dict]) -> None:
    for rank in two_ranks:  # every rank sees the mismatch, so no rank waits for the others in a collective
        checked = rank["replicas"]
        assert "differ between ranks" in checked.get("error", ""), checked
        assert "upper variables" in checked["error"]
        assert "diverged tensors differ between ranks" in checked.get("check_error", ""), checked
    assert two_ranks[0]["replicas"]["files"] == ["checkpoint.pt"]
    saved = two_ranks[0]["replicas"]["saved"]
    assert saved["step"] == 1, "the checkpoint of the diverged state must not replace the last good one"
    assert [r["rng"].tolist() for r in saved["ranks"]] == [[0.0, 0.0], [1.0, 1.0]]


# --- meta-learning: the meta-batch split over the ranks ---------------------------------------------
@pytest.mark.parametrize("name", cases.META_CASES)
def test_a_split_meta_batch_gives_the_single_process_meta_gradient(name: str, two_ranks: list[dict], single: dict) -> None:
    """Each rank evaluates its slice of the tasks; the sums over ranks are the whole meta-batch's
    meta-gradient, loss and task solutions up to the order of the additions (float64)."""
    reference = single[name]
    for key in ("grad", "loss", "lower", "residual"):
        for call, expected in enumerate(reference[key]):
            got = two_ranks[0]["cases"][name][key][call]
            assert _rel(got, expected) < 1e-10, f"{name} {key} call {call}: relative error {_rel(got, expected):.2e}"


@pytest.mark.parametrize(("meta_batch", "slices"), [(5, [(0, 3), (3, 5)]), (3, [(0, 2), (2, 3)])])
def test_each_rank_evaluates_only_its_slice_of_the_meta_batch(meta_batch: int, slices: list[tuple[int, int]],
                                                             two_ranks: list[dict]) -> None:
    whole = cases.task_values(meta_batch)
    for rank, (start, stop) in zip(two_ranks, slices):
        local = rank["tasks"][meta_batch]
        for part in ("query", "support"):  # the rank's own tasks, and only those
            assert local[part].shape == (stop - start,)
            torch.testing.assert_close(local[part], whole[part][start:stop], rtol=1e-12, atol=0.0)
    for objective in ("F", "G"):  # the ranks' parts add up to the objective of the whole meta-batch
        total = sum(rank["tasks"][meta_batch][objective] for rank in two_ranks)
        torch.testing.assert_close(total, whole[objective], rtol=1e-12, atol=0.0)


def test_a_meta_batch_smaller_than_the_number_of_processes_is_refused(two_ranks: list[dict]) -> None:
    for rank in two_ranks:
        message = rank["meta_batch_error"]
        assert "tasks.meta_batch" in message and "1 tasks per meta-batch cannot be split over 2 processes" in message


# --- runs: rank 0 writes; torchrun; resume after SIGKILL across ranks -------------------------------
def test_a_data_parallel_run_matches_the_single_process_run(two_ranks: list[dict], tmp_path: Path) -> None:
    """Full batches upstairs, minibatches of 8 per rank downstairs: the same run in one process
    differs (it draws 8 examples per step, not 2 x 8), so compare the run itself: rank 0 wrote
    everything, rank 1 nothing, and both returned rank 0's result."""
    main, other = (r["run"] for r in two_ranks)
    assert main["metrics"] is not None and other["metrics"] is None
    assert main["result"] == other["result"]
    assert main["result"]["world_size"] == WORLD and main["result"]["steps"] == cases.KILLABLE_STEPS
    records = [json.loads(line) for line in main["metrics"].splitlines()]
    assert [r["step"] for r in records] == list(range(1, cases.KILLABLE_STEPS + 1))
    assert records[-1]["upper_loss"] < records[0]["upper_loss"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
            "-m", "bilevel", *args]


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.01)


def test_torchrun_resume_after_sigkill_matches_uninterrupted(two_ranks: list[dict], tmp_path: Path) -> None:
    steps = cases.KILLABLE_STEPS
    spec = tmp_path / "ridge.yaml"
    # key order kept: the levels' data streams are seeded in declaration order
    spec.write_text(yaml.safe_dump(cases.killable_ridge(steps, delay=0.05), sort_keys=False))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun("run", str(spec), "--out", str(out), "-q"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "metrics.jsonl"
    kill_after = 5 + int.from_bytes(os.urandom(1), "little") % 16  # a random step in [5, 20]
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended (exit code {proc.returncode}) before it could be killed"
    ranks = _descendants(proc.pid)  # torchrun may start its workers in sessions of their own
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    _wait_gone(ranks)
    assert not (out / "result.json").exists(), "the run finished before it could be killed"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < saved["step"] < steps and saved["world_size"] == WORLD and len(saved["ranks"]) == WORLD

    resumed = subprocess.run(_torchrun("run", str(spec), "--out", str(out), "-q", "--resume"),
                             capture_output=True, text=True, timeout=180, env=_env())
    assert resumed.returncode == 0, resumed.stdout + "\n----\n" + resumed.stderr
    assert resumed.stderr.count("resuming from step") == 1  # rank 0 speaks for both
    assert "processes: 2" in resumed.stdout and resumed.stdout.count("final upper loss") == 1
    reference = two_ranks[0]["run"]
    result = json.loads((out / "result.json").read_text())
    assert result["upper_variables"] == reference["result"]["upper_variables"]
    assert result["final_upper_loss"] == reference["result"]["final_upper_loss"]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    ref_records = [json.loads(line) for line in reference["metrics"].splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["upper_loss"] for r in records] == [r["upper_loss"] for r in ref_records]

    # a checkpoint written by 2 processes is not resumed by 1
    with pytest.raises(SpecError, match=r"2 process\(es\)"):
        run(load_spec(spec), out=out, resume=True, progress=False)


def test_torchrun_meta_learning_run_matches_the_single_process_run(tmp_path: Path) -> None:
    """MAML on 3 quadratic tasks per step, split 2 / 1 over the ranks: the same meta-parameters and
    final loss as one process, and the meta-test (rank 0 alone) on them."""
    data = cases.maml(meta_batch=3)
    data["run"]["steps"] = 4
    spec = tmp_path / "maml.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    done = subprocess.run(_torchrun("run", str(spec), "--out", str(tmp_path / "ranks"), "-q"),
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stdout + "\n----\n" + done.stderr
    got = json.loads((tmp_path / "ranks" / "result.json").read_text())
    expected = run(load_spec(spec), out=tmp_path / "one", progress=False).result
    assert got["world_size"] == WORLD and expected["world_size"] == 1
    theta, reference = torch.tensor(got["upper_variables"]["theta"]), torch.tensor(expected["upper_variables"]["theta"])
    assert _rel(theta, reference) < 1e-10
    assert got["final_upper_loss"] == pytest.approx(expected["final_upper_loss"], rel=1e-10)
    for steps, scores in expected["meta_test"]["steps"].items():
        assert got["meta_test"]["steps"][steps]["query_loss"]["mean"] == pytest.approx(scores["query_loss"]["mean"], rel=1e-10)
    assert got["meta_test"]["tasks"] == expected["meta_test"]["tasks"]


def test_torchrun_a_meta_batch_smaller_than_the_number_of_processes_exits_with_code_2(tmp_path: Path) -> None:
    spec = tmp_path / "maml.yaml"
    spec.write_text(yaml.safe_dump(cases.maml(meta_batch=1), sort_keys=False))
    failed = subprocess.run(_torchrun("run", str(spec), "--out", str(tmp_path / "out"), "-q"),
                            capture_output=True, text=True, timeout=120, env=_env())
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", failed.stderr))
    assert codes == {"0": "2", "1": "2"}, failed.stderr
    assert failed.stderr.count("tasks.meta_batch: 1 tasks per meta-batch cannot be split over 2 processes") == 1, failed.stderr


# --- leaving a process that held a process group ---------------------------------------------------
def test_torchrun_a_spec_error_exits_with_code_2_on_every_rank(tmp_path: Path) -> None:
    """A chain is refused once the process group exists (compiling inside the data-parallel
    block), so each rank leaves through bilevel.distributed.leave_process, with the CLI's exit
    code and never aborted at interpreter shutdown; torchrun lists each rank's code."""
    failed = subprocess.run(_torchrun("run", "toy/three_level", "--out", str(tmp_path / "out"), "-q"),
                            capture_output=True, text=True, timeout=120, env=_env())
    assert failed.returncode != 0, failed.stdout + failed.stderr
    # torchrun's failure table: one entry per failed rank with its exit code
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", failed.stderr))
    assert codes == {"0": "2", "1": "2"}, failed.stderr
    assert failed.stderr.count("levels: 3 levels") == 1, failed.stderr  # rank 0 speaks for both
    assert "terminate called" not in failed.stderr and not (tmp_path / "out" / "result.json").exists()


class _Left(Exception):
    """Stands for os._exit in the test process: carries the status."""


@pytest.mark.parametrize(("args", "code", "printed"), [
    (("engines",), 0, None),
    (("validate", "missing.yaml"), 2, "error: missing.yaml"),
    (("--debug", "validate", "missing.yaml"), 1, "bilevel.spec.errors.SpecError: missing.yaml"),  # the traceback
])
def test_the_cli_leaves_a_process_that_held_a_group_with_its_exit_status(
    args: tuple[str, ...], code: int, printed: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bilevel.cli.main after a data-parallel block created a process group: every ending, an
    uncaught exception under --debug included, goes through os._exit with the status the
    interpreter would have given."""
    from bilevel import cli
    from bilevel.distributed import launch

    def left(status: int) -> None:
        raise _Left(status)

    monkeypatch.setattr(launch, "_created_group", True)
    monkeypatch.setattr(launch.os, "_exit", left)
    monkeypatch.setattr(launch.logging, "shutdown", lambda: None)  # keep pytest's log handlers
    monkeypatch.setattr(sys, "argv", ["bilevel", *args])
    with pytest.raises(_Left) as ended:
        cli.main()
    assert ended.value.args == (code,)
    if printed is not None:
        assert printed in capsys.readouterr().err


_LEAVE = """
import atexit, logging, sys
from bilevel.distributed import launch
atexit.register(lambda: print("atexit ran", flush=True))
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.getLogger("check").info("logged before leaving")
launch._created_group = True
print("buffered, no newline", end="")
launch.leave_process(5)
"""


def test_leave_process_flushes_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """After data_parallel created a process group: output and logs flushed, the status kept, the
    interpreter's finalization (atexit handlers included) skipped. Without one: sys.exit."""
    log = tmp_path / "log.txt"
    done = subprocess.run([sys.executable, "-c", _LEAVE, str(log)], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 5, done.stderr
    assert done.stdout == "buffered, no newline"  # flushed, and no atexit handler ran
    assert "logged before leaving" in log.read_text()

    from bilevel.distributed import leave_process, process_group_was_created

    assert not process_group_was_created()  # this test process never created one
    with pytest.raises(SystemExit) as ordinary:
        leave_process(5)
    assert ordinary.value.code == 5
