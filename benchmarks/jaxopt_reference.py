"""Reference numbers of JAXopt's lasso and sparse-coding examples, for tests/test_jaxopt_examples.py.

JAX and JAXopt are not dependencies of this project: run this in a separate environment,

    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax jaxlib jaxopt optax scikit-learn
    /tmp/jaxenv/bin/python benchmarks/jaxopt_reference.py

and copy the printed figures into the test (it records the versions it was run with). Both
examples are JAXopt's (examples/implicit_diff/lasso_implicit_diff.py and sparse_coding.py),
computed in float64 with their inner solvers run to convergence (tol 1e-13 and more iterations;
the lasso example's defaults, 500 iterations at tol 1e-3, stop far from it on this
ill-conditioned data: its proximal-gradient and coordinate-descent variants then disagree by 30%
on the hypergradient) and the implicit linear systems solved to tol 1e-14:

* lasso: the diabetes data, rows normalized, 67/33 split (random_state 0); lam = exp(theta),
  inner objective 1/2 mean((X w - y)^2) + lam ||w||_1 (BlockCoordinateDescent, prox_lasso), outer
  mean((X_v w - y_v)^2); the value and d/dtheta at theta = 1, and the example's 10 steps of
  optax.adam(1e-2) from theta = 1, each inner solve warm-started at the previous solution;
* sparse coding: make_sparse_coded_signal(74 samples, 7 components, 13 features, 3 nonzeros,
  random_state 0), scaled by 0.1 (the example's extra 1e-4 Gaussian noise from jax.random is left
  out: it cannot be drawn outside JAX); the dictionary starts at the top 7 right singular vectors
  (numpy's SVD, each row's largest entry made positive); codes = argmin 1/2 ||X - C D||^2 +
  elastic net (regularization 0.01, elastic_penalty 0.01: l1 = 0.01, l2 = 1e-4); the value of
  the dictionary loss 1/2 ||X - C*(D) D||^2 and its gradient in D, through the codes."""

from __future__ import annotations

import json
from functools import partial
from importlib.metadata import version

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxopt import BlockCoordinateDescent, ProximalGradient, linear_solve, objective, prox
from sklearn import datasets, model_selection, preprocessing

jax.config.update("jax_enable_x64", True)
SOLVE = partial(linear_solve.solve_normal_cg, tol=1e-14, maxiter=5000)


def lasso() -> dict:
    X, y = datasets.load_diabetes(return_X_y=True)
    X = preprocessing.normalize(X)
    X_tr, X_val, y_tr, y_val = model_selection.train_test_split(X, y, test_size=0.33, random_state=0)
    solver = BlockCoordinateDescent(fun=objective.least_squares, block_prox=prox.prox_lasso, maxiter=200000, tol=1e-13,
                                    implicit_diff_solve=SOLVE)

    def outer(theta, init):
        w = solver.run(init, jnp.exp(theta), (X_tr, y_tr)).params
        return jnp.mean((X_val @ w - y_val) ** 2), w

    (value, w), grad = jax.value_and_grad(outer, has_aux=True)(1.0, jnp.zeros(10))
    theta, init, opt = jnp.asarray(1.0), jnp.zeros(10), optax.adam(1e-2)
    state, losses = opt.init(theta), []
    for _ in range(10):
        (loss, init), g = jax.value_and_grad(outer, has_aux=True)(theta, init)
        updates, state = opt.update(g, state)
        theta = optax.apply_updates(theta, updates)
        losses.append(float(loss))
    return {"value": float(value), "grad": float(grad), "w": [float(v) for v in w], "losses": losses, "theta": float(theta)}


def sparse_coding() -> dict:
    N, k, d = 74, 7, 13
    X, _, _ = datasets.make_sparse_coded_signal(n_samples=N, n_components=k, n_features=d, n_nonzero_coefs=k // 2, random_state=0)
    X = 0.1 * (X.T if X.shape == (d, N) else X)
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    D0 = vt[:k] * np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]

    def loss(codes, dic, data):
        return 0.5 * jnp.sum((data - codes @ dic) ** 2)

    solver = ProximalGradient(fun=loss, prox=prox.prox_elastic_net, maxiter=100000, tol=1e-14, implicit_diff_solve=SOLVE)

    def outer(dic):
        codes = solver.run(jnp.zeros((N, k)), [0.01, 0.01], dic, X).params
        return loss(codes, dic, X), codes

    (value, codes), grad = jax.value_and_grad(outer, has_aux=True)(jnp.asarray(D0))
    return {"value": float(value), "zeros": int((np.asarray(codes) == 0).sum()), "grad": np.asarray(grad).tolist()}


if __name__ == "__main__":
    versions = {name: version(name) for name in ("jax", "jaxlib", "jaxopt", "optax", "numpy", "scikit-learn")}
    print(json.dumps({"versions": versions, "lasso": lasso(), "sparse_coding": sparse_coding()}, indent=1))
