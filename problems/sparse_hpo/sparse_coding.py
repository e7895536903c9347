"""JAXopt's sparse-coding example as a bilevel problem (Mairal, Bach & Ponce 2012, "Task-Driven
Dictionary Learning", TPAMI; JAXopt's examples/implicit_diff/sparse_coding.py):

    C*(D) = argmin_C  1/2 ||X - C D||_F^2 + l1 ||C||_1 + l2/2 ||C||_F^2     (codes: 74 x 7, elastic net)
    min_D  F(D) = 1/2 ||X - C*(D) D||_F^2                                       (dictionary: 7 x 13)

The codes are the lower level, with the elastic net as their prox (JAXopt's prox_elastic_net with
regularization 0.01 and elastic_penalty 0.01: l1 = 0.01, l2 = 0.01 * 0.01); the dictionary is
upstairs. dF/dD goes through the codes by implicit differentiation of the proximal-gradient fixed
point. Data: scikit-learn's make_sparse_coded_signal (74 samples, 7 atoms, 13 features, 3
nonzero codes each, random_state 0), scaled by 0.1; the dictionary starts at the top 7 right
singular vectors of X (each row's largest entry made positive, so that the start does not
depend on the SVD routine's signs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["coded_signal", "coding_loss", "svd_dictionary"]


def coded_signal(n_samples: int = 74, n_components: int = 7, n_features: int = 13, seed: int = 0,
                 scale: float = 0.1) -> dict[str, Tensor]:
    """{X}: the signal of JAXopt's example, n_samples x n_features (without its 1e-4 JAX noise)."""
    from sklearn import datasets

    X, _, _ = datasets.make_sparse_coded_signal(n_samples=n_samples, n_components=n_components, n_features=n_features,
                                                n_nonzero_coefs=n_components // 2, random_state=seed)
    if X.shape == (n_features, n_samples):  # scikit-learn before 1.3 returned the transpose
        X = X.T
    return {"X": torch.as_tensor(scale * X, dtype=torch.float64)}


def svd_dictionary(n_components: int = 7, **signal: Any) -> Tensor:
    """The top right singular vectors of the signal, each row's largest-magnitude entry positive."""
    X = coded_signal(n_components=n_components, **signal)["X"].numpy()
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    rows = vt[:n_components]
    rows = rows * np.sign(rows[np.arange(n_components), np.abs(rows).argmax(1)])[:, None]
    return torch.as_tensor(rows, dtype=torch.float64)


def coding_loss(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """1/2 ||X - C D||_F^2: the smooth part of the lower objective, and the upper objective."""
    return 0.5 * ((batch["X"] - lower["codes"] @ upper["D"]) ** 2).sum()
