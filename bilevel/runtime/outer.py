"""Outer (upper-level) optimizers: torch.optim ones, and normalized momentum for BO-REP."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bilevel.schedules import scheduled_value
from bilevel.spec.level import OptimizerSpec

__all__ = ["NormalizedMomentum", "build_outer_optimizer", "scheduled_lr"]


class NormalizedMomentum(torch.optim.Optimizer):
    """m <- beta m + (1 - beta) g;  x <- x - lr m / ||m||, the norm taken over all parameters
    together (Cutkosky & Mehta 2020; the upper update of BO-REP, Hao et al. 2024)."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.9, eps: float = 1e-12, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                grad = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                buffer.mul_(group["momentum"]).add_(grad, alpha=1 - group["momentum"])
                buffers.append(buffer)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in buffers]))
            scale = group["lr"] / torch.clamp(norm, min=group["eps"])
            for p, buffer in zip(params, buffers):
                p.sub_(buffer * scale)
        return None


def build_outer_optimizer(spec: OptimizerSpec | None, params: tuple[Tensor, ...]) -> torch.optim.Optimizer:
    """The optimizer over the upper leaves, from the top level's ``solver``."""
    spec = spec or OptimizerSpec()
    decay = spec.weight_decay
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=decay)
    if spec.name == "momentum":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=decay)
    if spec.name == "normalized_momentum":
        return NormalizedMomentum(params, lr=spec.lr, momentum=spec.momentum, weight_decay=decay)
    return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=decay)


def scheduled_lr(spec: OptimizerSpec | None, step: int, total: int) -> float:
    """The learning rate at outer step ``step`` of ``total`` (a pure function of the step, so a
    resumed run follows the same schedule; ``bilevel.schedules``). ``spec.schedule_steps``, when
    set, replaces ``total`` as the schedule's length."""
    spec = spec or OptimizerSpec()
    return scheduled_value(spec.lr, step, spec.schedule_steps or total, spec.schedule, spec.final_lr_ratio,
                           spec.power_base, spec.schedule_warmup)
