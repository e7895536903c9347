"""What the inner solvers share: the stop on the inner residual, and Armijo's test.

**Residual stop.** A solve with a tolerance ends once ||grad_y G(x, y)|| <= tol. The test is
evaluated on the device at every step, and from the first step at which it holds every update is
masked (``torch.where``): the iterate, its optimizer state and the step count stay frozen. The
loop itself has a static shape, so it can be captured in a CUDA graph; an eager loop may in
addition end early, reading the test on the host once every ``check_every`` steps (one host
synchronization per reading, the only one in the loop). Both give the same iterate: the first one
at which the test held, reached after at most check_every - 1 frozen steps.

**Armijo's test** (sufficient decrease; Nocedal & Wright 2006, eq. 3.4) for a trial step a along a
descent direction d from y:

    G(y + a d) <= G(y) + c1 a grad G(y)^T d + 8 eps |G(y)|,

the last term (eps: the machine epsilon of the dtype) allowing for the rounding error of the two
values: close to a solution, the decrease c1 a |grad G^T d| ~ ||grad G||^2 falls below what
float32 resolves in G, and the plain test would then fail at every trial and stall the solve
(the same reason as Hager & Zhang's approximate Wolfe conditions, 2005)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ResidualStop", "armijo"]


def armijo(trial: Tensor, value: Tensor, step: Tensor | float, slope: Tensor, c1: float) -> Tensor:
    """Whether the trial value satisfies the sufficient-decrease test above (False where it is not
    finite); ``slope`` is grad G(y)^T d, negative along a descent direction. A boolean 0-d tensor."""
    slack = 8 * torch.finfo(value.dtype).eps * value.abs()
    return torch.isfinite(trial) & (trial <= value + c1 * step * slope + slack)


class ResidualStop:
    """The stopping test of one solve: ``done`` (sticky, on the device) once an observed residual
    is <= tol, the steps taken before it, and when an eager loop may read it.

    ``tol`` None: never done (a fixed number of steps). ``sync`` False (inside a captured graph):
    never read on the host; the loop runs to its end, frozen once done."""

    def __init__(self, tol: float | None, check_every: int, sync: bool, like: Tensor):
        self.tol = tol
        self.every = check_every if sync else 0
        self.done = torch.zeros((), dtype=torch.bool, device=like.device)

    def observe(self, residual: Tensor) -> Tensor:
        """Record the residual at the current iterate; returns ``active`` (not yet done), the mask
        of the update that follows."""
        if self.tol is not None:
            self.done = self.done | (residual <= self.tol)
        return ~self.done

    def keep(self, old: Sequence[Tensor], new: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``new`` where the solve is still running, ``old`` once it is done (elementwise, per tensor)."""
        if self.tol is None:
            return tuple(new)
        return tuple(torch.where(self.done, o, n) for o, n in zip(old, new))

    def exit(self, index: int) -> bool:
        """At step ``index`` (from 0), after its residual was observed (or after its update):
        whether an eager loop ends here. Reads the test on the host
        (one synchronization) every ``check_every`` steps only; otherwise False without reading."""
        if self.tol is None or self.every <= 0 or (index + 1) % self.every:
            return False
        return bool(self.done)
