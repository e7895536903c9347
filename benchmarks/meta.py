"""One MAML meta-gradient on a meta-batch of 25 sinusoid tasks (2x40 ReLU MLP, K = 10 support and
10 query points, inner SGD lr 0.01), timed side by side in one process on the same tasks and
initial weights:

* ours: the unrolled engine on the stacked meta-batch (one vmap over the tasks), and with the
  tasks evaluated one by one on views of the stacked tensors (``vectorize: loop``);
* higher: ``innerloop_ctx`` per task, the query losses backpropagated task by task;
* TorchOpt: the differentiable ``MetaSGD`` optimizer per task, state restored between tasks;
* plain PyTorch: the same loop written with ``torch.autograd.grad(create_graph=True)``.

Every method's meta-gradient is checked against ours (relative error, float32) before timing.

    python benchmarks/meta.py [--steps 1] [--repeats 20] [--device cpu|cuda] [--json out.json]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_name, measure, write_json  # noqa: E402
from bilevel import build_engine, compile_spec  # noqa: E402
from bilevel.engines import UnrolledConfig  # noqa: E402
from bilevel.spec import load_spec, spec_from_data  # noqa: E402
from problems.meta.sinusoid import mlp  # noqa: E402


def _problem(steps: int, device: str, vectorize: str) -> Any:
    data = load_spec(ROOT / "problems" / "meta" / "sinusoid_maml.yaml").spec.model_dump(mode="json")
    data["levels"]["task"]["solver"]["steps"] = steps
    data["run"]["device"] = device
    problem = compile_spec(spec_from_data(data))
    problem.stacked.vectorize = vectorize
    return problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="inner SGD steps per task")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    import higher
    import torchopt

    problems = {v: _problem(args.steps, args.device, v) for v in ("vmap", "loop")}
    problem = problems["vmap"]
    query = problem.upper.batch()
    support = problem.lower.data.stream.current["support"]
    for other in problems.values():  # the same meta-batch for both
        other.lower.data.stream.current = problem.lower.data.stream.current
    engine = build_engine(UnrolledConfig(fast_path="off"))
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    count, lr = problem.instances, problem.lower.solver.lr
    net = mlp().to(device)
    with torch.no_grad():
        for p, value in zip(net.parameters(), x):
            p.copy_(value)
    params = list(net.parameters())

    def ours(vectorize: str) -> Any:
        return lambda: engine.hypergrad(problems[vectorize], x, state, query).grad

    def with_higher() -> Any:
        net.zero_grad()
        for i in range(count):
            with higher.innerloop_ctx(net, torch.optim.SGD(params, lr=lr), copy_initial_weights=False) as (fnet, opt):
                for _ in range(args.steps):
                    opt.step(F.mse_loss(fnet(support["x"][i]), support["y"][i]))
                (F.mse_loss(fnet(query["x"][i]), query["y"][i]) / count).backward()
        return [p.grad.clone() for p in params]

    inner = torchopt.MetaSGD(net, lr=lr)

    def with_torchopt() -> Any:
        net.zero_grad()
        saved_net, saved_opt = torchopt.extract_state_dict(net, by="reference"), torchopt.extract_state_dict(inner, by="reference")
        for i in range(count):
            for _ in range(args.steps):
                inner.step(F.mse_loss(net(support["x"][i]), support["y"][i]))
            (F.mse_loss(net(query["x"][i]), query["y"][i]) / count).backward()
            torchopt.recover_state_dict(net, saved_net)
            torchopt.recover_state_dict(inner, saved_opt)
        return [p.grad.clone() for p in params]

    names = [n for n, _ in net.named_parameters()]

    def plain() -> Any:
        total = [torch.zeros_like(p) for p in params]
        for i in range(count):
            weights = list(params)
            for _ in range(args.steps):
                out = torch.func.functional_call(net, dict(zip(names, weights)), (support["x"][i],))
                grads = torch.autograd.grad(F.mse_loss(out, support["y"][i]), weights, create_graph=True)
                weights = [w - lr * g for w, g in zip(weights, grads)]
            out = torch.func.functional_call(net, dict(zip(names, weights)), (query["x"][i],))
            grads = torch.autograd.grad(F.mse_loss(out, query["y"][i]) / count, params)
            total = [t + g for t, g in zip(total, grads)]
        return total

    calls = {"ours (vmap)": ours("vmap"), "ours (loop)": ours("loop"), "higher": with_higher, "TorchOpt MetaSGD": with_torchopt,
             "plain PyTorch": plain}
    figures = measure(calls, device, warmup=3, repeats=args.repeats)
    reference = figures["ours (vmap)"]["value"]
    flat = torch.cat([g.reshape(-1) for g in reference])
    base = figures["ours (vmap)"]["median_ms"]
    print(f"one MAML meta-gradient, {count} sinusoid tasks, {args.steps} inner step(s), {device_name(device)}, torch {torch.__version__}")
    print(f"{'method':20s} {'median ms':>10s} {'vs ours':>8s} {'rel err vs ours':>16s}")
    for name, figure in figures.items():
        got = torch.cat([g.reshape(-1) for g in figure["value"]])
        err = float((got - flat).norm() / flat.norm())
        print(f"{name:20s} {figure['median_ms']:10.2f} {figure['median_ms'] / base:8.2f} {err:16.2e}")
    if args.json is not None:
        write_json(args.json, {"device": device_name(device), "steps": args.steps, "tasks": count,
                               "figures": {k: {"median_ms": v["median_ms"]} for k, v in figures.items()}})


if __name__ == "__main__":
    main()
