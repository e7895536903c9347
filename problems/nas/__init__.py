"""Differentiable architecture search (DARTS, Liu et al. 2019; PC-DARTS, Xu et al. 2020; RARTS,
Xue et al. 2021) on cell search spaces: the data of the bundled presets.

    min_alpha  L_val(w*(alpha), alpha)   s.t.   w*(alpha) = argmin_w L_train(w, alpha)

alpha (upper) are the architecture's mixture weights, w (lower) the supernet's weights; both
objectives are ``bilevel.nas:supernet_loss`` on different data.

Presets:
* ``nas/digits``: the 8x8 digits bundled with scikit-learn, a 3-cell conv space. The preset's split
  (shuffled, seed 0; ``n_train = n_val = 300``): 300 search-train / 300 search-validation / 1197
  test images; retraining uses the 600 search images, testing the 1197 (the data functions'
  defaults, 600 / 600 / 597, are for other uses). Search and retraining take a few minutes on one
  CPU core (measured figures in README.md).
* ``nas/tabular``: an MLP cell space on the same digits as 64 features (tabular data).
* ``nas/cifar10``: the DARTS CIFAR-10 layout (8 cells, 16 channels, 8 operations, 25k/25k split).
  CIFAR-10 is read from a local folder holding the python-pickle batches (``cifar-10-batches-py``)
  when ``root`` (or the CIFAR10_ROOT environment variable) names one; otherwise synthetic images of
  the same shape (10k training, 2k test) stand in so the pipeline runs anywhere."""

from __future__ import annotations

import os
import pickle
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from problems.common.images import image_split

__all__ = [
    "cifar10_data",
    "cifar10_retrain_data",
    "digits_data",
    "digits_retrain_data",
    "load_cifar10",
]

Split = dict[str, Tensor]


def _shape(split: Split, flat: bool) -> Split:
    return {"x": split["x"].flatten(1) if flat else split["x"], "y": split["y"]}


def digits_data(part: str = "train", flat: bool = False, seed: int = 0, n_train: int = 600, n_val: int = 600) -> Split:
    """The search data: ``part`` = train (trains w) or val (trains alpha); images (N, 1, 8, 8) in
    [0, 1], or (N, 64) features with ``flat``."""
    if part not in ("train", "val", "test"):
        raise ValueError(f"part must be train, val or test (got {part!r})")
    return _shape(image_split("digits", n_train, n_val, seed)[part], flat)


def digits_retrain_data(flat: bool = False, seed: int = 0, n_train: int = 600, n_val: int = 600) -> dict[str, Split]:
    """Retraining data: the search's train + validation images for training, the held-out test images."""
    split = image_split("digits", n_train, n_val, seed)
    train = {k: torch.cat([split["train"][k], split["val"][k]]) for k in ("x", "y")}
    return {"train": _shape(train, flat), "test": _shape(split["test"], flat)}


# --- CIFAR-10 ------------------------------------------------------------------------------------
_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
_STD = torch.tensor([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)


class _BatchUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 python batches without executing arbitrary code: only the classes a
    numpy array needs to be rebuilt are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as handle:
        batch = _BatchUnpickler(handle, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def _batches_folder(root: str | Path) -> Path | None:
    root = Path(root).expanduser()
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


@lru_cache(maxsize=2)
def load_cifar10(root: str | None = None, synthetic_train: int = 10000, synthetic_test: int = 2000, seed: int = 0) -> dict[str, Split]:
    """CIFAR-10 train (50k) and test (10k) images, normalized per channel, from ``root`` (a folder
    with the python batches, or its parent). Without it, synthetic images of the same shape (10k
    training and 2k test images by default: the cost per step does not depend on the set's size):
    each class has a fixed random smooth pattern, an image is 0.6 pattern + N(0, 1) noise
    (learnable, not trivial)."""
    folder = _batches_folder(root) if root else None
    if folder is not None:
        parts = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([p[1] for p in parts])
        x_test, y_test = _read_batch(folder / "test_batch")

        def norm(x: np.ndarray) -> Tensor:
            return (torch.from_numpy(x).float() / 255.0 - _MEAN) / _STD

        return {"train": {"x": norm(x_train), "y": torch.from_numpy(y_train)},
                "test": {"x": norm(x_test), "y": torch.from_numpy(y_test)},
                "source": {"synthetic": torch.tensor(False)}}
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(10, 3, 8, 8, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        y = torch.randint(0, 10, (n,), generator=gen)
        return {"x": 0.6 * patterns[y] + torch.randn(n, 3, 32, 32, generator=gen), "y": y}

    return {"train": draw(synthetic_train), "test": draw(synthetic_test), "source": {"synthetic": torch.tensor(True)}}


def _root(root: str | None) -> str | None:
    """The CIFAR-10 folder: ``root``, else the CIFAR10_ROOT environment variable; warns when
    neither holds the batches and synthetic images are used."""
    root = root or os.environ.get("CIFAR10_ROOT") or None
    if root is None or _batches_folder(root) is None:
        where = f"no CIFAR-10 python batches under {root!r}" if root else "CIFAR10_ROOT is not set"
        warnings.warn(f"{where}: using synthetic images of the CIFAR-10 shape", stacklevel=3)
    return root if root is not None and _batches_folder(root) is not None else None



def cifar10_data(part: str = "train", root: str | None = None, n: int | None = None, seed: int = 0) -> Split:
    """The DARTS search split: the first half of the 50k training images trains w (``train``), the
    second half trains alpha (``val``). ``n`` keeps the first n images of the part (smoke tests).
    ``root`` (default: the CIFAR10_ROOT environment variable) is the folder with the python batches."""
    if part not in ("train", "val"):
        raise ValueError(f"part must be train or val (got {part!r})")
    root = _root(root)
    synthetic = 2 * n if n is not None and not root else 10000
    train = load_cifar10(root, synthetic_train=synthetic, synthetic_test=max(2, synthetic // 5), seed=seed)["train"]
    half = train["y"].shape[0] // 2
    part_slice = slice(0, half) if part == "train" else slice(half, 2 * half)
    x, y = train["x"][part_slice], train["y"][part_slice]
    if n is not None:
        x, y = x[:n], y[:n]
    return {"x": x, "y": y}


def cifar10_retrain_data(root: str | None = None, n: int | None = None, seed: int = 0) -> dict[str, Split]:
    """Retraining data: all training images (or the first n) and the test images."""
    root = _root(root)
    synthetic = 2 * n if n is not None and not root else 10000
    data = load_cifar10(root, synthetic_train=synthetic, synthetic_test=max(2, synthetic // 5), seed=seed)
    train, test = data["train"], data["test"]
    if n is not None:
        train = {k: v[:n] for k, v in train.items()}
        test = {k: v[: max(2, n // 5)] for k, v in test.items()}
    return {"train": dict(train), "test": dict(test)}
