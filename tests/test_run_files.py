"""Files of a run directory: the mode atomic writes give them, and write_new_json, which never
replaces a file."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from bilevel.runtime.atomic import atomic_write_json, file_mode, save_checkpoint, write_new_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_get_the_umask_mode_not_0600(tmp_path: Path, umask_022: None) -> None:
    assert file_mode() == 0o644
    atomic_write_json(tmp_path / "result.json", {"a": 1})
    save_checkpoint(tmp_path, {"step": 1})
    for name in ("result.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    os.umask(0o002)  # a group-writable umask is honoured too
    atomic_write_json(tmp_path / "result.json", {"a": 2})
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o664


def test_write_new_json_numbers_files_and_never_replaces_one(tmp_path: Path) -> None:
    first = write_new_json(tmp_path / "retrains", "retrain", {"n": 1})
    second = write_new_json(tmp_path / "retrains", "retrain", {"n": 2})
    assert [first.name, second.name] == ["retrain-001.json", "retrain-002.json"]
    (tmp_path / "retrains" / "retrain-004.json").write_text("{}")  # someone else's file, out of order
    third = write_new_json(tmp_path / "retrains", "retrain", {"n": 3})
    fourth = write_new_json(tmp_path / "retrains", "retrain", {"n": 4})
    assert [third.name, fourth.name] == ["retrain-003.json", "retrain-005.json"]
    assert json.loads((tmp_path / "retrains" / "retrain-004.json").read_text()) == {}
    assert [json.loads(p.read_text())["n"] for p in (first, second, third, fourth)] == [1, 2, 3, 4]
    assert not list((tmp_path / "retrains").glob(".*.tmp"))  # no temporary file left behind


def test_concurrent_writers_each_get_their_own_file(tmp_path: Path) -> None:
    written: list[Path] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        path = write_new_json(tmp_path, "retrain", {"writer": i})
        with lock:
            written.append(path)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({p.name for p in written}) == 8
    assert sorted(json.loads(p.read_text())["writer"] for p in written) == list(range(8))
