"""Hypergradients are bit-identical (float64) to the figures recorded before the engines, the
problem model and the planner were consolidated: every engine on the closed-form problems,
chains of three levels, a batch of instances and the digits preset, over successive
warm-started calls and short runs (benchmarks/reference_hypergrads.py recorded them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import reference_hypergrads as reference  # noqa: E402

STORED = json.loads(reference.STORE.read_text())


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded (the figures did not depend on it; the recording fixed it)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(reference.CALLS))
def test_successive_hypergradients_are_bit_identical(name: str) -> None:
    assert reference.call_case(name) == STORED[name]


@pytest.mark.parametrize("name", list(reference.RUNS))
def test_short_runs_end_bit_identical(name: str) -> None:
    assert reference.run_case(name) == STORED[name]
