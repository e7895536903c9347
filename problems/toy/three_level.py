"""A three-level quadratic with a closed-form hypergradient: the oracle of the multilevel engines.

Levels a in R^p (top) -> b in R^m (middle) -> c in R^n (bottom):

    bottom:  G_C(a, b, c) = 1/2 c^T A_c c - c^T (B_c b + D_c a)                      A_c SPD
    middle:  G_B(a, b, c) = 1/2 b^T A_b b - b^T E_b a + 1/2 ||K c - s||^2               A_b SPD
    top:     F(a, b, c)   = 1/2 ||L c - t||^2 + 1/2 ||N b - u||^2 + rho/2 ||a||^2

Bottom solution (linear in (a, b)):

    c*(a, b) = P b + Q a,        P = A_c^{-1} B_c,  Q = A_c^{-1} D_c.

The middle level minimizes phi_B(a, b) = G_B(a, b, c*(a, b)), a strongly convex quadratic in b
with Hessian M = A_b + P^T K^T K P:

    grad_b phi_B = M b - E_b a + P^T K^T (K Q a - s) = 0
    b*(a) = R a + r,             R = M^{-1} (E_b - P^T K^T K Q),  r = M^{-1} P^T K^T s,
    c*(a) = c*(a, b*(a)) = S a + P r,   S = P R + Q.

The top level's hypergradient, its Hessian and its minimizer:

    dF/da = rho a + R^T N^T (N b*(a) - u) + S^T L^T (L c*(a) - t)
    a*    = (rho I + R^T N^T N R + S^T L^T L S)^{-1} (R^T N^T (u - N r) + S^T L^T (t - L P r)).

Every term of the chain is present: the bottom solution moves with both levels above it, the
middle objective depends on the bottom solution (through K), and F reads all three levels.
The data of each level is its own source (``three_level_data(part=...)``), drawn from one seed."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from bilevel.reporting.optimum import KNOWN_OPTIMUM, known_optimum
from bilevel.spec import BilevelSpec

__all__ = [
    "OPTIMUM_TOLERANCE",
    "bottom_objective",
    "report",
    "middle_objective",
    "three_level_closed_form",
    "three_level_data",
    "three_level_spec",
    "top_objective",
]

_PARTS = ("top", "middle", "bottom")


def _spd(k: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(low, high, k, dtype=torch.float64)) @ q.T


@lru_cache(maxsize=16)
def _arrays(p: int, m: int, n: int, q: int, seed: int) -> dict[str, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "bottom": {
            "A": _spd(n, 1.0, 2.0, gen),
            "B": torch.randn(n, m, generator=gen, dtype=torch.float64) / m**0.5,
            "D": torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5,
        },
        "middle": {
            "A": _spd(m, 1.0, 2.0, gen),
            "E": torch.randn(m, p, generator=gen, dtype=torch.float64) / p**0.5,
            "K": 0.5 * torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5,
            "s": torch.randn(m, generator=gen, dtype=torch.float64),
        },
        "top": {
            "L": torch.randn(q, n, generator=gen, dtype=torch.float64) / n**0.5,
            "t": torch.randn(q, generator=gen, dtype=torch.float64),
            "N": torch.randn(q, m, generator=gen, dtype=torch.float64) / m**0.5,
            "u": torch.randn(q, generator=gen, dtype=torch.float64),
        },
    }


def three_level_data(part: str, p: int = 2, m: int = 3, n: int = 4, q: int = 5, seed: int = 0) -> dict[str, Tensor]:
    """The matrices of one level ("top", "middle" or "bottom"); each part shares a first dimension."""
    if part not in _PARTS:
        raise ValueError(f"part must be one of {', '.join(_PARTS)}, got {part!r}")
    return dict(_arrays(p, m, n, q, seed)[part])


def bottom_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """G_C: ``upper`` holds a and b (the levels above), ``lower`` holds c."""
    a, b, c = upper["a"], upper["b"], lower["c"]
    return 0.5 * c @ (batch["A"] @ c) - c @ (batch["B"] @ b + batch["D"] @ a)


def middle_objective(upper: Any, lower: Any, batch: dict[str, Tensor]) -> Tensor:
    """G_B: ``upper`` holds a, ``lower`` holds b and c (this level and the one below)."""
    a, b, c = upper["a"], lower["b"], lower["c"]
    return 0.5 * b @ (batch["A"] @ b) - b @ (batch["E"] @ a) + 0.5 * ((batch["K"] @ c - batch["s"]) ** 2).sum()


def top_objective(upper: Any, lower: Any, batch: dict[str, Tensor], rho: float = 0.1) -> Tensor:
    """F: ``upper`` holds a (the top level), ``lower`` holds b and c."""
    a, b, c = upper["a"], lower["b"], lower["c"]
    return 0.5 * ((batch["L"] @ c - batch["t"]) ** 2).sum() + 0.5 * ((batch["N"] @ b - batch["u"]) ** 2).sum() + 0.5 * rho * (a**2).sum()


def three_level_closed_form(
    a: Tensor, p: int = 2, m: int = 3, n: int = 4, q: int = 5, seed: int = 0, rho: float = 0.1
) -> dict[str, Tensor]:
    """b*(a), c*(a), dF/da at ``a`` and the top minimizer a*, from the formulas above."""
    data = _arrays(p, m, n, q, seed)
    bottom, middle, top = ({k: v.to(a) for k, v in data[part].items()} for part in ("bottom", "middle", "top"))
    P = torch.linalg.solve(bottom["A"], bottom["B"])
    Q = torch.linalg.solve(bottom["A"], bottom["D"])
    K, L, N = middle["K"], top["L"], top["N"]
    M = middle["A"] + P.T @ K.T @ K @ P
    R = torch.linalg.solve(M, middle["E"] - P.T @ K.T @ K @ Q)
    r = torch.linalg.solve(M, P.T @ K.T @ middle["s"])
    S = P @ R + Q
    b = R @ a + r
    c = S @ a + P @ r
    grad = rho * a + R.T @ N.T @ (N @ b - top["u"]) + S.T @ L.T @ (L @ c - top["t"])
    hessian = rho * torch.eye(p, dtype=a.dtype) + R.T @ N.T @ N @ R + S.T @ L.T @ L @ S
    a_star = torch.linalg.solve(hessian, R.T @ N.T @ (top["u"] - N @ r) + S.T @ L.T @ (top["t"] - L @ P @ r))
    return {"b": b, "c": c, "hypergrad": grad, "a_star": a_star}


OPTIMUM_TOLERANCE = 1e-6
"""Relative distance ||a - a*|| / ||a*|| that counts as having reached a* (the tests' bound)."""


def report(upper: Any, lower: Any, rho: float = 0.1) -> dict[str, Any]:
    """The final a against the closed-form a*: relative distance and the known-optimum verdict."""
    a = upper["a"].detach()
    a_star = three_level_closed_form(a, rho=rho)["a_star"]
    distance = float((a - a_star).norm() / a_star.norm())
    return {"a_relative_distance": distance,
            KNOWN_OPTIMUM: known_optimum("a* (closed form)", distance, OPTIMUM_TOLERANCE, "relative distance ||a - a*|| / ||a*||")}


def three_level_spec(
    p: int = 2,
    m: int = 3,
    n: int = 4,
    q: int = 5,
    seed: int = 0,
    rho: float = 0.1,
    middle_steps: int = 40,
    bottom_steps: int = 40,
    warm_start: bool = False,
    maxiter: int = 8,
    engine: str = "auto",
    **run: Any,
) -> BilevelSpec:
    """The three-level quadratic as a spec (float64, CPU). GD at lr 0.6 on both lower levels
    contracts by at least 0.4 per step (Hessian eigenvalues in [1, 2] for the bottom, about
    [1, 2.2] for the middle), so 40 cold-started steps converge to machine precision;
    ``maxiter`` CG iterations (>= the level sizes) solve each linear system exactly."""
    shape = {"p": p, "m": m, "n": n, "q": q, "seed": seed}

    def data(part: str) -> dict[str, Any]:
        return {"source": "problems.toy.three_level:three_level_data", "kwargs": {"part": part, **shape}}

    lower_facts = {"convexity": "strongly_convex", "smoothness": "bounded"}
    engine_spec: dict[str, Any] = {"kind": engine}
    if engine == "implicit":
        engine_spec["linear_solver"] = {"method": "cg", "maxiter": maxiter}
    return BilevelSpec.model_validate(
        {
            "name": "toy-three-level",
            "levels": {
                "top": {
                    "variables": {"a": {"shape": [p], "init": "normal"}},
                    "objective": "problems.toy.three_level:top_objective",
                    "objective_kwargs": {"rho": rho},
                    "data": data("top"),
                    "solver": {"name": "momentum", "lr": 0.45, "momentum": 0.4},
                },
                "middle": {
                    "parent": "top",
                    "variables": {"b": {"shape": [m]}},
                    "objective": "problems.toy.three_level:middle_objective",
                    "data": data("middle"),
                    "solver": {"name": "sgd", "lr": 0.6, "steps": middle_steps, "warm_start": warm_start},
                    "assumptions": lower_facts,
                },
                "bottom": {
                    "parent": "middle",
                    "variables": {"c": {"shape": [n]}},
                    "objective": "problems.toy.three_level:bottom_objective",
                    "data": data("bottom"),
                    "solver": {"name": "sgd", "lr": 0.6, "steps": bottom_steps, "warm_start": warm_start},
                    "assumptions": lower_facts,
                },
            },
            "engine": engine_spec,
            "run": {"dtype": "float64", "device": "cpu", "seed": seed, **run},
        }
    )
