"""Outer (upper-level) optimizers: torch.optim ones, normalized momentum for BO-REP, and
hypergradient descent (SGD-HD, Adam-HD) for an outer lr that adapts itself."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bilevel.schedules import scheduled_value
from bilevel.spec.level import OptimizerSpec

__all__ = ["HypergradientDescent", "NormalizedMomentum", "build_outer_optimizer", "scheduled_lr"]


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


class HypergradientDescent(torch.optim.Optimizer):
    """SGD-HD and Adam-HD (Baydin, Cornish, Martinez Rubio, Schmidt & Wood 2018, "Online Learning
    Rate Adaptation with Hypergradient Descent"): before each step the learning rate takes one
    gradient step of its own,

        lr_t = lr_{t-1} + beta <g_t, u_{t-1}>,      x_t = x_{t-1} - lr_t u_t,

    u = g for sgd and Adam's bias-corrected m / (sqrt v + eps) for adam (u_0 = 0), the inner
    product over all parameters of the group. The same rule as the inner optimizer's
    (``bilevel.optim_extras``), here in torch.optim form. The adapted lr is a tensor in the state
    of the group's first parameter (checkpointed with the optimizer; no host synchronization);
    ``group["lr"]`` is only its starting value."""

    def __init__(self, params: Iterable[Tensor], lr: float, beta: float, adam: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "beta": beta, "adam": adam, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    def adapted_lr(self, group: int = 0) -> Tensor | float:
        """The current learning rate of a group (its starting value before the first step)."""
        first = self.state[self.param_groups[group]["params"][0]]
        return first.get("adapted_lr", self.param_groups[group]["lr"])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            first = self.state[group["params"][0]]
            if "adapted_lr" not in first:
                first["adapted_lr"] = torch.tensor(group["lr"], dtype=params[0].dtype, device=params[0].device)
            decay, (b1, b2) = group["weight_decay"], group["betas"]
            grads = [p.grad if decay == 0 else p.grad.add(p, alpha=decay) for p in params]
            states = [self.state[p] for p in params]
            previous = [state.get("direction") for state in states]
            product = sum((g * u).sum() for g, u in zip(grads, previous) if u is not None)
            lr = first["adapted_lr"].add_(group["beta"] * product) if isinstance(product, Tensor) else first["adapted_lr"]
            for p, g, state in zip(params, grads, states):
                if group["adam"]:
                    if "m" not in state:
                        state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                        state["step"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    state["step"] += 1
                    state["m"].mul_(b1).add_(g, alpha=1 - b1)
                    state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    direction = (state["m"] / (1 - b1 ** state["step"])) / ((state["v"] / (1 - b2 ** state["step"])).sqrt() + group["eps"])
                else:
                    direction = g.clone()
                p.sub_(lr * direction)
                state["direction"] = direction
        return None


def build_outer_optimizer(spec: OptimizerSpec | None, params: tuple[Tensor, ...]) -> torch.optim.Optimizer:
    """The optimizer over the upper leaves, from the top level's ``solver``."""
    spec = spec or OptimizerSpec()
    decay = spec.weight_decay
    if spec.lr_hypergradient is not None:
        return HypergradientDescent(params, lr=spec.lr, beta=spec.lr_hypergradient, adam=spec.name == "adam",
                                    betas=spec.betas, eps=spec.eps, weight_decay=decay)
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
