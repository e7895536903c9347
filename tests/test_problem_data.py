"""The data shared by the problem families (problems/common/data.py): seeded splits that cover
the examples once, standardization with training statistics only, data sources of one part."""

from __future__ import annotations

import pytest
import torch

from problems.common.data import bundled, digits_images, part_source, shuffled_split, standardized


def test_a_split_is_a_seeded_permutation_cut_in_three() -> None:
    rows = torch.arange(20)
    data = {"x": rows.double().reshape(20, 1) * 10, "y": rows}
    split = shuffled_split(data, 12, 5, seed=3)
    assert [len(split[p]["y"]) for p in ("train", "val", "test")] == [12, 5, 3]
    order = torch.cat([split[p]["y"] for p in ("train", "val", "test")])
    assert sorted(order.tolist()) == list(range(20))  # every example exactly once
    assert torch.equal(order, torch.randperm(20, generator=torch.Generator().manual_seed(3)))
    for part in split.values():  # the tensors of a part stay aligned row by row
        assert torch.equal(part["x"][:, 0], part["y"].double() * 10)
    assert torch.equal(shuffled_split(data, 12, 5, seed=3)["test"]["y"], split["test"]["y"])
    assert not torch.equal(shuffled_split(data, 12, 5, seed=4)["train"]["y"], split["train"]["y"])


def test_a_generator_is_drawn_from_and_left_for_the_caller() -> None:
    generator = torch.Generator().manual_seed(7)
    shuffled_split({"y": torch.arange(10)}, 4, 3, generator)
    expected = torch.Generator().manual_seed(7)
    torch.randperm(10, generator=expected)
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=expected))


@pytest.mark.parametrize(("n_train", "n_val"), [(0, 3), (5, -1), (7, 3), (10, 0)])
def test_sizes_that_leave_no_test_example_are_refused(n_train: int, n_val: int) -> None:
    with pytest.raises(ValueError, match="must leave test examples"):
        shuffled_split({"y": torch.arange(10)}, n_train, n_val, 0)


def test_standardization_uses_the_training_part_only() -> None:
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5 + 2
    x[:, 3] = 1.0  # a constant column: the floor keeps it finite
    split = standardized(shuffled_split({"x": x}, 20, 5, 1), min_std=0.5)
    train = split["train"]["x"]
    assert train.dtype == torch.float32
    assert torch.allclose(train[:, :3].mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(train[:, :3].std(0), torch.ones(3), atol=1e-6)
    assert torch.equal(split["val"]["x"][:, 3], torch.zeros(5))
    raw = shuffled_split({"x": x}, 20, 5, 1)
    mean, std = raw["train"]["x"].mean(0), raw["train"]["x"].std(0).clamp_min(0.5)
    assert torch.equal(split["test"]["x"], ((raw["test"]["x"] - mean) / std).float())


def test_bundled_sets_and_digit_images() -> None:
    features, labels = bundled("breast_cancer")
    assert features.shape == (569, 30) and features.dtype == torch.float64 and set(labels.tolist()) == {0, 1}
    images, digits = digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.equal(images.flatten(1) * 16, bundled("digits")[0].float()) and torch.equal(digits, bundled("digits")[1])
    with pytest.raises(ValueError, match="unknown bundled data set"):
        bundled("mnist")  # type: ignore[arg-type]


def test_a_part_source_returns_a_new_dict_of_one_part() -> None:
    cached = shuffled_split({"y": torch.arange(12)}, 4, 3, 2)

    def split(**kwargs: object) -> dict:
        assert kwargs == {"seed": 2}
        return cached

    val_data = part_source(split, "val")
    assert val_data.__name__ == "val_data" and val_data.__module__ == __name__
    part = val_data(seed=2)
    assert part is not cached["val"] and part["y"] is cached["val"]["y"]
    part["extra"] = torch.zeros(3)
    assert set(cached["val"]) == {"y"}
