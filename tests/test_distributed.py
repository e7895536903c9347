"""Data-parallel runs on 2 gloo processes (CPU): every engine's hypergradient on sharded data
equals the single-process one on the union of the shards (float64)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from runtime_data import distributed_cases as cases

WORLD = 2


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case computed on 2 spawned gloo ranks (one launch for the whole module)."""
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(cases.worker, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    return cases.all_cases()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", list(cases.CASES))
def test_distributed_hypergradient_equals_single_process(name: str, two_ranks: list[dict], single: dict) -> None:
    reference = single[name]
    for key in ("grad", "loss", "residual", "lower"):
        for call, expected in enumerate(reference[key]):
            got = two_ranks[0]["cases"][name][key][call]
            assert _rel(got, expected) < 1e-6, f"{name} {key} call {call}: relative error {_rel(got, expected):.2e}"
            # replicated: every rank holds bit-identical values
            assert torch.equal(got, two_ranks[1]["cases"][name][key][call]), f"{name} {key}: ranks differ"


def test_each_rank_draws_minibatches_from_its_own_shard(two_ranks: list[dict]) -> None:
    first, second = (set(r["indices"]) for r in two_ranks)
    assert first <= set(range(0, 16)) and second <= set(range(16, 31))
    assert len(first) == 16 and len(second) == 12  # an epoch of 4 batches of 4 / 3 batches of 4 (15 rows)
