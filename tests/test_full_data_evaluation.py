"""Evaluating an objective on a level's whole data set batch by batch (the run's final upper
loss, the per-instance results) gives the one-batch value: chunks cover the data in order, are
weighted by their sizes, and are no larger than the level's batch size."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bilevel import run
from bilevel.compile import compile_spec
from bilevel.data import DataStream, evaluate_on_all_data
from bilevel.spec import spec_from_data


def _regression(batch: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """A mean over the batch's examples plus a term that does not depend on the batch."""
    return 0.5 * ((batch["x"] @ w - batch["t"]) ** 2).mean() + 0.1 * (w * w).sum()


def test_chunks_cover_the_data_in_order_and_the_weighted_mean_is_the_one_batch_value() -> None:
    gen = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(10, 3, generator=gen, dtype=torch.float64), "t": torch.randn(10, generator=gen, dtype=torch.float64)}
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    stream = DataStream(data, batch_size=4, seed=0)
    chunks = list(stream.chunks())
    assert [count for _, count in chunks] == [4, 4, 2]
    for name in data:
        assert torch.equal(torch.cat([batch[name] for batch, _ in chunks]), data[name])

    seen: list[int] = []

    def objective(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(batch["x"].shape[0])
        return _regression(batch, w)

    whole = _regression(data, w)
    assert float(evaluate_on_all_data(objective, stream)) == pytest.approx(float(whole), rel=1e-13)
    assert max(seen) == 4
    unweighted = sum(float(_regression(batch, w)) for batch, _ in chunks) / len(chunks)
    assert abs(unweighted - float(whole)) > 1e-3  # the smaller last chunk must count less


def test_without_a_batch_size_the_whole_set_is_one_call() -> None:
    """A level without a batch size may have an objective that is not a mean (here a sum): it is
    evaluated once, on everything."""
    data = {"x": torch.arange(7.0)}
    calls: list[int] = []

    def total(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(batch["x"].shape[0])
        return batch["x"].sum()

    assert float(evaluate_on_all_data(total, DataStream(data, batch_size=None, seed=0))) == 21.0
    assert float(evaluate_on_all_data(total, DataStream(data, batch_size=7, seed=0))) == 21.0  # one batch holds all
    assert calls == [7, 7]
    assert float(evaluate_on_all_data(lambda batch: torch.tensor(3.0), None)) == 3.0


def _spec(upper_batch: int | None, **top: Any) -> dict[str, Any]:
    kwargs = {"dataset": "mixture", "n_train": 90, "n_val": 90, "d": 10, "classes": 4, "seed": 0}
    return {
        "name": "chunked-evaluation",
        "levels": {
            "upper": {"variables": {"lam": {"shape": [90], "init": 0.0}}, "objective": "problems.hyperclean:upper_objective",
                      "data": {"source": "problems.hyperclean:val_data", "kwargs": kwargs, "batch_size": upper_batch},
                      "solver": {"name": "adam", "lr": 0.1}},
            "lower": {"parent": "upper", "variables": {"W": {"shape": [4, 10], "init": "normal", "init_scale": 0.1}, "b": {"shape": [4]}},
                      "objective": "problems.hyperclean:lower_objective", "objective_kwargs": {"mu": 1e-2},
                      "data": {"source": "problems.hyperclean:train_data", "kwargs": kwargs},
                      "solver": {"name": "sgd", "lr": 0.2, "steps": 15},
                      "assumptions": {"convexity": "strongly_convex"}},
        },
        "engine": {"kind": "implicit"},
        "run": {"device": "cpu", "dtype": "float64", "seed": 0, "steps": 3, "checkpoint_every": None},
        **top,
    }


def test_a_runs_final_upper_loss_is_the_one_batch_value(tmp_path, monkeypatch) -> None:
    """90 validation examples in batches of 32 (32 + 32 + 26): result.json's final upper loss is F
    on all 90 at once, at the run's final variables, though evaluated batch by batch."""
    chunked: list[int] = []
    original = DataStream.chunks

    def recording(self: DataStream):
        for batch, count in original(self):
            chunked.append(count)
            yield batch, count

    monkeypatch.setattr(DataStream, "chunks", recording)
    loaded = spec_from_data(_spec(upper_batch=32))
    result = run(loaded, out=tmp_path, progress=False)
    assert chunked == [32, 32, 26]
    problem = compile_spec(loaded)
    assert problem.upper.data is not None and problem.upper.data.batch_size == 32
    whole = problem.upper_objective(result.x, result.y, problem.upper.data.full)
    assert result.result["final_upper_loss"] == pytest.approx(float(whole), rel=1e-12)


def test_per_instance_final_losses_are_the_one_batch_values(tmp_path) -> None:
    vary = {"levels.upper.data.kwargs.seed": [0, 1], "levels.lower.data.kwargs.seed": [0, 1],
            "levels.upper.variables.lam.init": [0.0, 0.5]}
    loaded = spec_from_data(_spec(upper_batch=32, instances={"count": 2, "vary": vary}))
    result = run(loaded, out=tmp_path, progress=False)
    problem = compile_spec(loaded)
    with torch.no_grad():
        whole = problem.upper_losses(result.x, result.y, problem.upper.data.full)
    losses = [entry["final_upper_loss"] for entry in result.result["instances"]]
    assert losses == pytest.approx(whole.tolist(), rel=1e-12)
    assert abs(losses[0] - losses[1]) > 1e-6  # two different instances, not one value twice
