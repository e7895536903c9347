"""The one Hessian-vector product and mixed VJP of the lower objective, shared by every engine.

For G(x, y) with gradient g(x, y) = grad_y G:

    H v      = grad^2_yy G v      = d/dy <g, v>
    J^T v    = (grad^2_xy G)^T v  = d/dx <g, v>

``reverse`` mode builds the graph of g once (one backward with create_graph) and then each
product is one more backward through it (double backward; Pearlmutter 1994). ``forward`` mode
computes H v as a forward-mode JVP of torch.func.grad (forward-over-reverse), which does not keep
the graph of g alive between products.

Data-parallel runs: the objectives passed in are this rank's shares of the union objective, and
what these functions return are the union's quantities, summed over ranks here and nowhere else
(bilevel.distributed.reduce states the semantics): gradients and values in grad_and_value (through a
differentiable sum when the gradient is to be differentiated, as in unrolling), and each product
of the Linearization, which keeps its local graph of grad_y G. A single process communicates
nothing.

With ``create_graph=True`` the products are themselves differentiable: x and y stay attached to
the graph they come from (each product is still the partial derivative at (x, y), taken through
an alias of each input), and the products record their own graph. Differentiating through them
gives the third-order terms that multilevel problems need (bilevel/linalg/argmin.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from bilevel.distributed.reduce import sum_over_ranks, sum_over_ranks_differentiable
from bilevel.linalg.tree import zeros_for_none

__all__ = ["Linearization", "grad_and_value", "joint_grad"]

Params = tuple[Tensor, ...]


def grad_and_value(
    fn: Callable[[Params], Tensor],
    params: Sequence[Tensor],
    create_graph: bool = False,
    local: bool = False,
    stop_at: Sequence[Tensor] = (),
) -> tuple[Params, Tensor]:
    """(grad fn(params), fn(params)) with unused inputs getting zero gradients.

    Under data parallelism both are summed over ranks (one collective): as values, or through the
    differentiable sum when ``create_graph`` (the gradient is then differentiated, e.g. by
    unrolling). ``local=True`` returns this rank's share unsummed.

    ``stop_at``: other tensors fn uses that are graph-connected (the variables of the levels
    above, in nested unrolling). The params are first replaced by p + 0 * s, s a scalar read from
    those tensors: the same values, but new graph nodes downstream of them. Two effects:

    * the gradient is the partial derivative through fn's argument. Differentiated directly, a
      param that one of those tensors was computed from (a warm-started lower iterate, which an
      upper variable's last step depended on) would get the total derivative, the path through
      that tensor included: a different gradient, hence a different inner algorithm;
    * autograd skips graph nodes whose topological number is below that of every tensor it
      differentiates with respect to and walks all the others, so the history behind stop_at is
      no longer walked at each call (a nest of N unrolled steps costs O(N), not O(N^2)).

    The added path carries an exact zero; leaves need no lift and are skipped. fn must compute
    everything that depends on params from its argument: a tensor it closes over that was
    computed from the un-lifted params is not differentiated through."""
    anchors = [t.reshape(-1)[0] for t in stop_at if t.grad_fn is not None and t.numel() > 0]
    if anchors:
        lift = 0 * torch.stack(anchors).sum()
        params = tuple(p + lift for p in params)
    else:
        params = tuple(params)
    value = fn(params)
    grads = torch.autograd.grad(value, params, create_graph=create_graph, allow_unused=True)
    grads = zeros_for_none(grads, params)
    if local:
        return grads, value
    *summed, value = (sum_over_ranks_differentiable if create_graph else sum_over_ranks)((*grads, value))
    return tuple(summed), value


def joint_grad(
    fn: Callable[[Params, Params], Tensor], x: Sequence[Tensor], y: Sequence[Tensor]
) -> tuple[Params, Params, Tensor]:
    """(grad_x fn, grad_y fn, fn(x, y)) from one backward, at fresh leaves made from x and y."""
    n = len(x)
    leaves = tuple(p.detach().requires_grad_(True) for p in (*x, *y))
    with torch.enable_grad():
        grads, value = grad_and_value(lambda v: fn(v[:n], v[n:]), leaves)
    return grads[:n], grads[n:], value.detach()


def _alias(p: Tensor) -> Tensor:
    """A new graph node equal to p: derivatives taken with respect to it are partial derivatives
    (paths that reach the output through other inputs are not followed), while results stay
    differentiable with respect to p itself. A tensor outside any graph becomes a fresh leaf."""
    return p.view_as(p) if p.requires_grad else p.detach().requires_grad_(True)


class Linearization:
    """Second-order information of G at (x, y), through products only (never a dense Hessian).

    ``objective(x, y)`` must be G on a fixed batch. By default the products are plain tensors
    (x and y are detached into fresh leaves); with ``create_graph=True`` they are differentiable
    in x, y and the vector (reverse mode only; call it with grad mode enabled)."""

    def __init__(
        self,
        objective: Callable[[Params, Params], Tensor],
        x: Sequence[Tensor],
        y: Sequence[Tensor],
        mode: Literal["reverse", "forward"] = "reverse",
        create_graph: bool = False,
    ):
        if create_graph and mode == "forward":
            raise ValueError("create_graph needs reverse-mode products")
        self.objective = objective
        self.mode = mode
        self.create_graph = create_graph
        if create_graph:
            self.x = tuple(_alias(p) for p in x)
            self.y = tuple(_alias(p) for p in y)
        else:
            self.x = tuple(p.detach().requires_grad_(True) for p in x)
            self.y = tuple(p.detach().requires_grad_(True) for p in y)
        # the local graph of grad_y G^(r): products are taken through it and then summed over ranks
        self._local_grad_y, value = grad_and_value(lambda yy: objective(self.x, yy), self.y, create_graph=True, local=True)
        *grad_y, self.value = sum_over_ranks((*self._local_grad_y, value))
        self.grad_y: Params = tuple(grad_y)
        """grad_y G at (x, y) (summed over ranks; in a single process the tensors of the graph itself)."""

    def hvp(self, v: Sequence[Tensor]) -> Params:
        """grad^2_yy G v."""
        if self.mode == "forward":
            return self._hvp_forward(tuple(v))
        out = torch.autograd.grad(
            self._local_grad_y, self.y, tuple(v), retain_graph=True, create_graph=self.create_graph, allow_unused=True
        )
        return sum_over_ranks(zeros_for_none(out, self.y))

    def _hvp_forward(self, v: Params) -> Params:
        x = tuple(p.detach() for p in self.x)
        y = tuple(p.detach() for p in self.y)

        def grad_y(yy: Params) -> Params:
            return torch.func.grad(lambda t: self.objective(x, t))(yy)

        _, tangent = torch.func.jvp(grad_y, (y,), (v,))
        return sum_over_ranks(tuple(tangent))

    def vjp_x(self, v: Sequence[Tensor], retain_graph: bool = False) -> Params:
        """(grad^2_xy G)^T v, i.e. d/dx <grad_y G, v>."""
        out = torch.autograd.grad(
            self._local_grad_y, self.x, tuple(v), retain_graph=retain_graph or self.create_graph,
            create_graph=self.create_graph, allow_unused=True,
        )
        return sum_over_ranks(zeros_for_none(out, self.x))

    def hvp_batched(self, basis: Tensor) -> Tensor:
        """Rows H e_i for a batch of flat vectors ``basis`` (k, n): assembles H for a direct solve."""
        shapes = [p.shape for p in self.y]
        sizes = [p.numel() for p in self.y]
        parts = torch.split(basis, sizes, dim=1)
        vs = tuple(part.reshape(basis.shape[0], *shape) for part, shape in zip(parts, shapes))
        out = torch.autograd.grad(self._local_grad_y, self.y, vs, retain_graph=True, is_grads_batched=True, allow_unused=True)
        rows = [
            torch.zeros(basis.shape[0], n, dtype=basis.dtype, device=basis.device) if g is None else g.reshape(basis.shape[0], -1)
            for g, n in zip(out, sizes)
        ]
        return sum_over_ranks((torch.cat(rows, dim=1),))[0]
