"""Declare and run a bilevel problem from Python: learn one L2 strength per input feature of a
small linear regression so that the fitted model does well on held-out data.

The objectives live in this file; the spec refers to them as "<this file>:name", exactly as a
YAML spec would. Run:  python examples/python_api.py"""

from __future__ import annotations

from pathlib import Path

import torch

import bilevel

HERE = Path(__file__).resolve()


def data(split: str, n: int = 60, d: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic regression where only the first 3 features matter."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(d)
    w_true[:3] = torch.tensor([2.0, -1.0, 0.5])
    x = torch.randn(2 * n, d, generator=gen)
    t = x @ w_true + 0.5 * torch.randn(2 * n, generator=gen)
    part = slice(0, n) if split == "train" else slice(n, 2 * n)
    return {"x": x[part], "t": t[part]}


def lower(upper, lower, batch):
    """Training MSE + 1/2 sum_j exp(lam_j) w_j^2."""
    residual = batch["x"] @ lower["w"] - batch["t"]
    return 0.5 * (residual**2).mean() + 0.5 * (torch.exp(upper["lam"]) * lower["w"] ** 2).sum()


def upper(upper, lower, batch):
    """Validation MSE."""
    return 0.5 * ((batch["x"] @ lower["w"] - batch["t"]) ** 2).mean()


def build_spec(steps: int = 200, out: str = "runs/python-api") -> bilevel.BilevelSpec:
    ref = f"{HERE}:"
    return bilevel.BilevelSpec.model_validate(
        {
            "name": "per-feature-ridge",
            "levels": {
                "upper": {
                    # exp(lam) adds to the lower Hessian: the box keeps plain GD (lr 0.1) stable
                    "variables": {"lam": {"shape": [12], "init": 0.0, "set": {"low": -8.0, "high": 2.0}}},
                    "objective": ref + "upper",
                    "data": {"source": ref + "data", "kwargs": {"split": "val"}},
                    "solver": {"name": "adam", "lr": 0.1},
                },
                "lower": {
                    "parent": "upper",
                    "variables": {"w": {"shape": [12]}},
                    "objective": ref + "lower",
                    "data": {"source": ref + "data", "kwargs": {"split": "train"}},
                    "solver": {"name": "sgd", "lr": 0.1, "steps": 50},
                    "assumptions": {"convexity": "strongly_convex"},
                },
            },
            "run": {"steps": steps, "out": out, "device": "cpu"},
        }
    )


def main(steps: int = 200, out: str = "runs/python-api") -> bilevel.RunResult:
    spec = build_spec(steps, out)
    plan = bilevel.make_plan(bilevel.compile_spec(spec))
    print(f"engine: {plan.engine.kind}")
    for reason in plan.reasons:
        print(f"  - {reason}")
    result = bilevel.run(spec, progress=False)
    lam = torch.tensor(result.result["upper_variables"]["lam"])
    print(f"validation loss {result.result['final_upper_loss']:.4f}")
    print("learned L2 strengths exp(lam):", [round(v, 3) for v in torch.exp(lam).tolist()])
    return result


if __name__ == "__main__":
    main()
