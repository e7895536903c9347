"""MAML and first-order MAML on the sinusoid protocol, written with torch.func alone: an
implementation independent of bilevel's engines, to tell what the method does on these tasks
from what this package does.

The same task distribution (``sinusoid_tasks``: amplitude U[0.1, 5], phase U[0, pi], K = 10
support and 10 query points) and the same 2x40 ReLU MLP (``mlp``) as the presets; Adam 1e-3 on
the meta-parameters, one SGD step of lr 0.01 per task, meta-batch 25, the meta-gradient through
that step (MAML) or with its Jacobian taken as the identity (first order: the inner gradient
detached). The meta-test adapts on 600 fresh tasks (drawn from seed + 12345) with a 100-point query grid and prints the
mean query MSE +- its 95% confidence interval after 0, 1 and 10 steps.

    python -m problems.meta.plain_reference --method fomaml --seed 0 --steps 70000
    python -m problems.meta.plain_reference --method fomaml --seed 0 --steps 70000 --init finn

Its tasks are drawn from its own generator, not from the presets' task stream, so a seed here is
not the same run as the preset's seed: compare the spread over seeds."""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from problems.meta.sinusoid import mlp, sinusoid_tasks

__all__ = ["train"]

Params = dict[str, Tensor]


def train(method: str, seed: int, steps: int, tasks: int = 600, init: str = "torch") -> dict[int, tuple[float, float]]:
    """Meta-train with ``method`` (maml or fomaml) for ``steps`` outer steps; returns
    {adaptation steps: (mean query MSE, 95% CI half-width)} over ``tasks`` meta-test tasks.
    ``init``: torch (nn.Linear's default, as the presets) or finn (the initialization of Finn et
    al.'s code: weights from a normal of std 0.01 truncated at two deviations, zero biases)."""
    torch.manual_seed(seed)
    net = mlp()
    if init == "finn":
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                torch.nn.init.zeros_(layer.bias)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in net.named_parameters()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    first_order = method == "fomaml"

    def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    def adapt(p: Params, x: Tensor, y: Tensor, count: int) -> Params:
        for _ in range(count):
            g = grad(loss)(p, x, y)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - 0.01 * g[k] for k in p}
        return p

    def task_loss(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, count: int = 1) -> Tensor:
        return loss(adapt(p, xs, ys, count), xq, yq)

    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = sinusoid_tasks(25, generator, shots=10)
        s, q = batch["support"], batch["query"]
        value = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, s["x"].float(), s["y"].float(),
                                                              q["x"].float(), q["y"].float()).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    test = sinusoid_tasks(tasks, torch.Generator().manual_seed(seed + 12345), shots=10, query_grid=100)
    s, q = test["support"], test["query"]
    frozen = {k: v.detach() for k, v in params.items()}
    out = {}
    for count in (0, 1, 10):
        losses = vmap(lambda p, xs, ys, xq, yq, c=count: task_loss(p, xs, ys, xq, yq, c),
                      in_dims=(None, 0, 0, 0, 0))(frozen, s["x"].float(), s["y"].float(), q["x"].float(), q["y"].float())
        out[count] = (float(losses.mean()), float(1.96 * losses.std() / math.sqrt(len(losses))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["maml", "fomaml"], default="fomaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=70000)
    parser.add_argument("--init", choices=["torch", "finn"], default="torch")
    args = parser.parse_args()
    started = time.perf_counter()
    result = train(args.method, args.seed, args.steps, init=args.init)
    cells = "  ".join(f"after {k}: {mean:.3f} +- {ci:.3f}" for k, (mean, ci) in result.items())
    print(f"{args.method} seed {args.seed}, {args.steps} steps: {cells}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
