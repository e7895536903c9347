"""A planar grasp toy with a known optimum, as a bilevel problem whose lower level is a small QP.

A disk of radius 1 is pushed by an external force of magnitude g in the direction phi
(w_ext = g (cos phi, sin phi), no torque). k = 3 frictional point contacts sit on its rim at the
angles theta_i = phi + delta_i; the upper variables are the offsets delta (where the fingers go).
Contact i pushes with a normal force a_i along the inward normal n_i = -(cos theta_i, sin theta_i)
and a tangential force b_i along t_i = (-sin theta_i, cos theta_i), inside the linearized
friction cone |b_i| <= mu a_i; its torque about the centre is b_i (the normal passes through it).

Lower level (the contact forces f = (a, b), a QP, strongly convex):

    G(delta, f) = 1/2 ||W(delta) f + (w_ext, 0)||^2 + eps/2 ||f||^2   s.t.  b_i - mu a_i <= 0,  -b_i - mu a_i <= 0,

W(delta) the 3 x 2k grasp matrix (net force and torque). Upper level: the best grasp is the one
whose optimal forces balance the push best, F(delta, f) = G(delta, f): the lower problem's value
(BODex's wrench-error objective).

**Known optimum.** Dropping the cones and the torque row only lowers the value, and the relaxed
problem, min over any k force vectors F_i of 1/2 ||sum F_i + w_ext||^2 + eps/2 sum ||F_i||^2, is
solved by F_i = -w_ext / (k + eps), with value

    v* = g^2 eps / (2 (k + eps)).

Every grasp in which each contact can push along -w_ext within its cone (|delta_i| <= atan mu)
and the tangential parts cancel in torque (sum_i sin delta_i = 0, so sum b_i = 0) attains it, for
instance delta = 0: so v* is the optimal value of the bilevel problem. The instances differ in g
and phi (from their index) and in the starting offsets (from their seed); mu = 0.5."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bilevel.reporting.optimum import KNOWN_OPTIMUM, known_optimum
from bilevel.spec import BilevelSpec

__all__ = ["CONTACTS", "EPS", "MU", "OPTIMUM_TOLERANCE", "friction_cone", "instance_parameters", "optimal_value",
           "planar_grasp_spec", "report", "wrench_error"]

CONTACTS = 3
MU = 0.5
"""Friction coefficient of every contact."""
EPS = 0.1
"""eps: the force regularization that makes the QP strongly convex (and the optimum positive)."""
OPTIMUM_TOLERANCE = 1e-6
"""Relative gap (F - v*) / v* that counts as having reached the known optimum."""
_GOLDEN = (math.sqrt(5) - 1) / 2


def instance_parameters(instance: Tensor | float) -> tuple[Tensor, Tensor]:
    """(g, phi) of instance ``instance`` (0, 1, 2, ...): low-discrepancy sequences, so that any
    number of instances covers the ranges g in [0.5, 2] and phi in [0, 2 pi)."""
    i = torch.as_tensor(instance, dtype=torch.float64)
    g = 0.5 + 1.5 * _frac(i * _GOLDEN + 0.5)
    phi = 2 * math.pi * _frac(i * math.sqrt(3))
    return g, phi


def _frac(v: Tensor) -> Tensor:
    return v - torch.floor(v)


def optimal_value(instance: Tensor | float, eps: float = EPS, contacts: int = CONTACTS) -> Tensor:
    """v* = g^2 eps / (2 (k + eps)) of an instance."""
    g, _ = instance_parameters(instance)
    return g**2 * eps / (2 * (contacts + eps))


def wrench_error(upper: Any, lower: Any, batch: Any, instance: Tensor | float = 0.0, eps: float = EPS) -> Tensor:
    """G: 1/2 ||W(delta) f + w_ext||^2 + eps/2 ||f||^2 (also the upper objective)."""
    delta, forces = upper["delta"], lower["forces"]
    g, phi = (t.to(delta.dtype) for t in instance_parameters(instance))
    theta = phi + delta
    a, b = forces[:, 0], forces[:, 1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    fx = (-a * cos - b * sin).sum() + g * torch.cos(phi)
    fy = (-a * sin + b * cos).sum() + g * torch.sin(phi)
    torque = b.sum()
    return 0.5 * (fx**2 + fy**2 + torque**2) + 0.5 * eps * (forces**2).sum()


def friction_cone(upper: Any, lower: Any, batch: Any, mu: float = MU) -> Tensor:
    """The linearized cones, (b - mu a, -b - mu a) per contact, <= 0: affine in f, free of delta."""
    a, b = lower["forces"][:, 0], lower["forces"][:, 1]
    return torch.cat([b - mu * a, -b - mu * a])


def report(upper: Any, lower: Any, instance: float = 0.0) -> dict[str, Any]:
    """The gap to the known optimum v* and the grasp."""
    value = float(wrench_error(upper, lower, None, instance))
    best = float(optimal_value(instance))
    gap = (value - best) / best
    return {
        "value": value,
        "optimal_value": best,
        "relative_gap": gap,
        "delta": [float(d) for d in upper["delta"]],
        KNOWN_OPTIMUM: known_optimum("v* = g^2 eps / (2 (k + eps))", gap, OPTIMUM_TOLERANCE, "relative gap (F - v*) / v*"),
    }


def planar_grasp_spec(count: int = 1024, steps: int = 300, lr: float = 0.1, spread: float = 1.0,
                      dtype: str = "float64", device: str = "cpu", **run: Any) -> BilevelSpec:
    """The preset ``grasp/planar`` as a spec: ``count`` instances, ``steps`` Adam steps on the
    offsets (lr cosine-annealed from ``lr`` to lr / 100), starting uniform in [-spread, spread]."""
    kwargs = {"instance": 0.0}
    return BilevelSpec.model_validate({
        "name": "planar-grasp",
        "levels": {
            "fingers": {
                "variables": {"delta": {"shape": [CONTACTS], "init": "uniform", "init_scale": spread}},
                "objective": "problems.grasp.planar:wrench_error",
                "objective_kwargs": kwargs,
                "solver": {"name": "adam", "lr": lr, "schedule": "cosine", "final_lr_ratio": 0.01},
            },
            "forces": {
                "parent": "fingers",
                "variables": {"forces": {"shape": [CONTACTS, 2]}},
                "objective": "problems.grasp.planar:wrench_error",
                "objective_kwargs": kwargs,
                "constraints": [{"fn": "problems.grasp.planar:friction_cone", "kind": "inequality", "affine": True,
                                 "shape": [2 * CONTACTS], "kwargs": {"mu": MU}}],
                "solver": {"name": "sgd", "lr": 0.1, "steps": 0},  # unused: the qp engine solves the QP itself
                "assumptions": {"convexity": "strongly_convex", "quadratic": True},
            },
        },
        "instances": {"count": count, "vary": {"levels.fingers.objective_kwargs.instance": "index",
                                               "levels.forces.objective_kwargs.instance": "index",
                                               "report_kwargs.instance": "index"}},
        "report": "problems.grasp.planar:report",
        "run": {"dtype": dtype, "device": device, "steps": steps, **run},
    })
