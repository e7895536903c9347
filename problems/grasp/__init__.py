"""Batched bilevel QPs: planar grasps whose contact forces solve a wrench-balance QP
(BODex-style: Chen et al., "Scalable and Efficient Robotic Dexterous Grasp Synthesis Using
Bilevel Optimization"). See README.md and ``problems.grasp.planar``."""

from problems.grasp.planar import (
    CONTACTS,
    OPTIMUM_TOLERANCE,
    friction_cone,
    instance_parameters,
    optimal_value,
    planar_grasp_spec,
    report,
    wrench_error,
)

__all__ = ["CONTACTS", "OPTIMUM_TOLERANCE", "friction_cone", "instance_parameters", "optimal_value",
           "planar_grasp_spec", "report", "wrench_error"]
