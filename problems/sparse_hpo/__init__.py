"""Sparse hyperparameter optimization: the lasso and the elastic net with their regularization
strengths as upper variables (Bertrand, Klopfenstein, Blondel, Vaiter, Gramfort & Salmon 2020,
"Implicit differentiation of Lasso-type models for hyperparameter optimization", ICML; the
sparse-ho package; JAXopt's lasso example, Blondel et al. 2022).

    w*(l1, l2) = argmin_w  G(w) + g(w),   G(w) = 1/(2n) ||X w - t||^2,   g(w) = l1 ||w||_1 + l2/2 ||w||^2
    min        F(w*) = 1/n_v ||X_v w* - t_v||^2

G is the objective function of the lower level; g is declared as the variable's ``prox`` (l1 alone:
the lasso), and the inner solver takes proximal gradient steps. On the active set A = {j : w*_j != 0},
with s = sign(w*_A) and H = X^T X / n, the optimality condition H_AA w_A - X_A^T t / n + l1 s + l2 w_A = 0
gives, where the inactive entries satisfy |grad_j G| < l1 strictly,

    w*_A = (H_AA + l2 I)^{-1} (X_A^T t / n - l1 s),
    dw*_A/dl1 = -(H_AA + l2 I)^{-1} s,     dw*_A/dl2 = -(H_AA + l2 I)^{-1} w*_A,
    dF/dl = grad_A F . dw*_A/dl,           grad F = 2 X_v^T (X_v w* - t_v) / n_v,

and the inactive entries do not move (``lasso_hypergrad``). The split form w = u - v with u, v >= 0
(box sets) and G + l1 sum(u + v) is the same problem written without a prox.

Data: a synthetic sparse regression (``regression_data``) and the diabetes set of JAXopt's lasso
example (``diabetes_data``: scikit-learn's bundled copy, rows normalized, the same 67/33 split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LassoSolution",
    "diabetes_data",
    "lasso_hypergrad",
    "lasso_solution",
    "regression_data",
    "report",
    "smooth_lower",
    "sparse_hpo_spec",
    "split_lower",
    "split_upper",
    "validation_upper",
]


# --- data -------------------------------------------------------------------------------------
def _regression(n: int, n_val: int, p: int, nonzeros: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(p, dtype=torch.float64)
    support = torch.randperm(p, generator=gen)[:nonzeros]
    w_true[support] = torch.randn(nonzeros, generator=gen, dtype=torch.float64).sign() * (
        1 + torch.rand(nonzeros, generator=gen, dtype=torch.float64))
    X = torch.randn(n + n_val, p, generator=gen, dtype=torch.float64)
    return X, X @ w_true + noise * torch.randn(n + n_val, generator=gen, dtype=torch.float64)


def regression_data(split: str = "train", n: int = 60, n_val: int = 40, p: int = 20, nonzeros: int = 5,
                    noise: float = 0.5, seed: int = 0) -> dict[str, Tensor]:
    """{X, t} of a sparse linear model t = X w_true + noise (w_true with ``nonzeros`` entries of
    magnitude 1 to 2, X standard normal): the first n rows for ``split`` train, the next n_val for val."""
    X, t = _regression(n, n_val, p, nonzeros, noise, seed)
    rows = slice(0, n) if split == "train" else slice(n, n + n_val)
    return {"X": X[rows], "t": t[rows]}


def diabetes_data(split: str = "train") -> dict[str, Tensor]:
    """JAXopt's lasso example data: scikit-learn's diabetes set (442 x 10, bundled), each row
    scaled to unit norm (preprocessing.normalize), split by train_test_split(test_size=0.33,
    random_state=0): 296 train, 146 validation."""
    from sklearn import datasets, model_selection, preprocessing

    X, y = datasets.load_diabetes(return_X_y=True)
    X = preprocessing.normalize(X)
    X_tr, X_val, y_tr, y_val = model_selection.train_test_split(X, y, test_size=0.33, random_state=0)
    X, t = (X_tr, y_tr) if split == "train" else (X_val, y_val)
    return {"X": torch.as_tensor(X, dtype=torch.float64), "t": torch.as_tensor(t, dtype=torch.float64)}


# --- objectives -------------------------------------------------------------------------------
def smooth_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """G(w) = 1/(2n) ||X w - t||^2 (the non-smooth part is the variable's prox)."""
    residual = batch["X"] @ lower["w"] - batch["t"]
    return 0.5 * (residual**2).mean()


def validation_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """F(w) = 1/n_v ||X_v w - t_v||^2."""
    residual = batch["X"] @ lower["w"] - batch["t"]
    return (residual**2).mean()


def split_lower(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """The lasso as w = u - v, u, v >= 0 (box sets): 1/(2n) ||X (u - v) - t||^2 + l1 sum(u + v)."""
    residual = batch["X"] @ (lower["u"] - lower["v"]) - batch["t"]
    return 0.5 * (residual**2).mean() + upper["l1"] * (lower["u"].sum() + lower["v"].sum())


def split_upper(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """F(u - v)."""
    residual = batch["X"] @ (lower["u"] - lower["v"]) - batch["t"]
    return (residual**2).mean()


def report(upper: Any, lower: Any) -> dict[str, Any]:
    """The final strengths and the sparsity of the lower solution (w, or u - v in the split form)."""
    w = lower["w"] if "w" in lower else lower["u"] - lower["v"]
    out = {name: float(upper[name]) for name in ("l1", "l2") if name in upper}
    return {**out, "nonzeros": int((w != 0).sum()), "features": int(w.numel()), "w_l1_norm": float(w.abs().sum())}


# --- closed forms on the active set ------------------------------------------------------------
@dataclass(frozen=True)
class LassoSolution:
    """The minimizer of G + g, its active set and the derivatives of F at it."""

    w: Tensor
    active: Tensor
    """Boolean mask of the nonzero entries."""
    margin: float
    """min over inactive j of l1 - |grad_j G(w*)|: strict complementarity holds when > 0."""
    d_l1: Tensor
    """dF/dl1."""
    d_l2: Tensor
    """dF/dl2."""


def lasso_solution(l1: float, l2: float, train: dict[str, Tensor], steps: int = 3000) -> Tensor:
    """argmin_w 1/(2n) ||X w - t||^2 + l1 ||w||_1 + l2/2 ||w||^2 by FISTA (Beck & Teboulle 2009)
    in float64, then polished on its active set by the closed form above."""
    X, t = train["X"].double(), train["t"].double()
    n, p = X.shape
    H, c = X.T @ X / n, X.T @ t / n
    step = 1.0 / float(torch.linalg.eigvalsh(H).max() + l2)
    w = z = torch.zeros(p, dtype=torch.float64)
    momentum = 1.0
    for _ in range(steps):
        gradient = H @ z - c + l2 * z
        u = z - step * gradient
        w_next = torch.sign(u) * torch.clamp(u.abs() - step * l1, min=0)
        following = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        z = w_next + (momentum - 1) / following * (w_next - w)
        w, momentum = w_next, following
    active = w != 0
    s = torch.sign(w[active])
    polished = torch.zeros_like(w)
    polished[active] = torch.linalg.solve(H[active][:, active] + l2 * torch.eye(int(active.sum()), dtype=w.dtype),
                                          c[active] - l1 * s)
    if not torch.equal(torch.sign(polished[active]), s):
        raise ValueError("the active set of FISTA's solution is not that of its polished closed form; raise steps")
    return polished


def lasso_hypergrad(l1: float, l2: float, train: dict[str, Tensor], val: dict[str, Tensor]) -> LassoSolution:
    """The solution and dF/dl1, dF/dl2 by the closed form on the active set (module docstring)."""
    X, t = train["X"].double(), train["t"].double()
    Xv, tv = val["X"].double(), val["t"].double()
    n = X.shape[0]
    w = lasso_solution(l1, l2, train)
    active = w != 0
    H, c = X.T @ X / n, X.T @ t / n
    gradient = H @ w - c + l2 * w
    margin = float((l1 - gradient[~active].abs()).min()) if bool((~active).any()) else float("inf")
    system = H[active][:, active] + l2 * torch.eye(int(active.sum()), dtype=w.dtype)
    grad_f = 2 * Xv.T @ (Xv @ w - tv) / Xv.shape[0]
    d_l1 = -grad_f[active] @ torch.linalg.solve(system, torch.sign(w[active]))
    d_l2 = -grad_f[active] @ torch.linalg.solve(system, w[active])
    return LassoSolution(w, active, margin, d_l1, d_l2)


# --- specs ------------------------------------------------------------------------------------
def sparse_hpo_spec(
    form: str = "prox",
    l1: float = 0.1,
    l2: float | None = None,
    log_scale: bool = False,
    data: str = "problems.sparse_hpo:regression_data",
    data_kwargs: dict[str, Any] | None = None,
    inner_steps: int = 600,
    inner_lr: float = 0.5,
    outer: dict[str, Any] | None = None,
    convexity: str = "strongly_convex",
    **run: Any,
) -> Any:
    """A spec of the lasso (``l2`` None) or the elastic net with the strengths upstairs.

    ``form``: ``prox`` declares g as the prox of ``w`` (proximal gradient inner steps); ``split``
    writes the lasso as w = u - v with u, v in the box [0, inf) and l1 sum(u + v) in G (projected
    gradient steps). ``log_scale``: the strengths are hyperparameter variables on a log scale (the
    engines see log l; JAXopt's example uses l = exp(theta)), else plain tensors (dF/dl directly)."""
    from bilevel.spec import BilevelSpec

    if form not in ("prox", "split"):
        raise ValueError(f"form is prox or split, not {form!r}")
    if form == "split" and l2 is not None:
        raise ValueError("the split form is written for the lasso (l2 None)")
    kwargs = dict(data_kwargs or {})
    p = int(data_kwargs.get("p", 20)) if data_kwargs else 20
    if data.endswith(":diabetes_data"):
        p = 10

    def strength(value: float) -> dict[str, Any]:
        if log_scale:
            return {"kind": "hyperparameter", "log": True, "init": value}
        return {"shape": [], "init": value}

    upper_vars = {"l1": strength(l1)}
    if l2 is not None:
        upper_vars["l2"] = strength(l2)
    if form == "prox":
        prox = {"kind": "l1", "strength": "l1"} if l2 is None else {"kind": "elastic_net", "l1": "l1", "l2": "l2"}
        lower_vars: dict[str, Any] = {"w": {"shape": [p], "prox": prox}}
        lower_objective, upper_objective = "problems.sparse_hpo:smooth_lower", "problems.sparse_hpo:validation_upper"
    else:
        lower_vars = {name: {"shape": [p], "set": {"low": 0.0}} for name in ("u", "v")}
        lower_objective, upper_objective = "problems.sparse_hpo:split_lower", "problems.sparse_hpo:split_upper"
    return BilevelSpec.model_validate({
        "name": f"sparse-hpo-{'lasso' if l2 is None else 'elastic-net'}-{form}",
        "levels": {
            "upper": {
                "variables": upper_vars,
                "objective": upper_objective,
                "data": {"source": data, "kwargs": {**kwargs, "split": "val"}},
                "solver": outer or {"name": "adam", "lr": 0.05},
            },
            "lower": {
                "parent": "upper",
                "variables": lower_vars,
                "objective": lower_objective,
                "data": {"source": data, "kwargs": {**kwargs, "split": "train"}},
                "solver": {"name": "sgd", "lr": inner_lr, "steps": inner_steps, "warm_start": False},
                "assumptions": {"convexity": convexity},
            },
        },
        "run": {"dtype": "float64", "device": "cpu", "seed": 0, **run},
    })
