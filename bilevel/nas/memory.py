"""A rough estimate of the supernet's activation memory, for the planner.

Autograd keeps, per operation, about its input or output; the estimate counts the elements of
every leaf module's output (and of every mixed operation's weighted terms) in one forward pass
of one example, times the larger of the two levels' batch sizes, times the bytes of the dtype.
It is an estimate of the order of magnitude (the GPU script in benchmarks/nas_gpu.py measures the
real peak), good enough to choose between engines whose needs differ by a few copies of the
weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel.nas.entangled import EntangledConvLayer, EntangledConvOp
from bilevel.nas.macro import MacroSupernet
from bilevel.nas.supernet import MixedOp, Supernet

__all__ = ["activation_elements_per_example", "supernet_activation_mb"]


def activation_elements_per_example(net: Supernet | MacroSupernet, example: torch.Tensor, weights: Any) -> int:
    """Output elements of the leaf modules and mixed-operation terms for one example."""
    counted = [0]

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            if isinstance(module, MixedOp):
                counted[0] += output.numel() * module.terms
            elif isinstance(module, EntangledConvOp):  # its superposed convolutions run functionally, unhooked
                counted[0] += output.numel() * sum(isinstance(m, nn.Conv2d) and m.kernel_size == (module.largest,) * 2
                                                   for m in module.op.modules())
            elif isinstance(module, EntangledConvLayer):
                counted[0] += 2 * output.numel()  # the superposed convolution's output and the ReLU's
            elif not list(module.children()):
                counted[0] += output.numel()

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(example[:1], weights)
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return counted[0]


def supernet_activation_mb(problem: Any) -> float:
    """Estimated activation memory (MiB) of one forward/backward of the lower level's supernets
    on a batch; 0 when the lower level has no supernet or no data with an "x" entry."""
    lower, upper = problem.lower, problem.upper
    if lower.data is None or "x" not in lower.data.full:
        return 0.0
    example = lower.data.full["x"]
    sizes = [lvl.data.batch_size or lvl.data.size for lvl in (lower, upper) if lvl.data is not None]
    batch = max(sizes) if sizes else 1
    total = 0
    for binding in lower.modules.values():
        if isinstance(binding.module, Supernet):
            weights = _uniform_weights(binding.module)
        elif isinstance(binding.module, MacroSupernet):
            weights = binding.module.uniform_weights()
        else:
            continue
        total += activation_elements_per_example(binding.module, example, weights)
    return total * batch * (torch.finfo(problem.dtype).bits // 8) / 2**20


def _uniform_weights(net: Supernet) -> dict[str, torch.Tensor]:
    """Uniform mixture weights (1/O per operation, 1 per edge) of the right shapes."""
    from bilevel.nas.search_space import cell_edges, cell_graph

    space = net.spec.space
    n_edges = len(cell_edges(cell_graph(space.cell.inputs, space.cell.nodes, space.cell.edges)))
    param = next(net.parameters())
    ops = torch.full((n_edges, len(space.ops)), 1.0 / len(space.ops), dtype=param.dtype, device=param.device)
    weights = {t: ops for t in ("normal", "reduce")}
    if space.edge_normalization:
        weights.update({f"edge_{t}": torch.ones(n_edges, dtype=param.dtype, device=param.device) for t in ("normal", "reduce")})
    return weights
