"""Compiling one level: its variables built on the device (tensors, modules, hyperparameters,
architecture supernets), its objective, data, constraints and closed-form solution resolved."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.compile.issues import IssueLog
from bilevel.compile.prox import build_prox
from bilevel.data import DataStream
from bilevel.distributed.reduce import current_world
from bilevel.distributed.shard import replicated_share, shard_rows
from bilevel.hyperparameters import make_transform
from bilevel.nas.build import SearchSpaceError, build_variable_module
from bilevel.problem import Constraint, Level, ModuleBinding, project_onto
from bilevel.spec.hyperparameter import HyperparameterVariable
from bilevel.spec.level import LevelSpec, ModuleVariable, OptimizerSpec, TensorVariable
from bilevel.spec.problem import BilevelSpec

__all__ = ["LevelBuilder", "device_memory_bytes"]


def device_memory_bytes(device: torch.device) -> int | None:
    """The device's total memory: a GPU's, or the machine's physical memory (None when unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[1])
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


class LevelBuilder:
    """Builds the levels of one spec on a device and dtype, logging what it cannot build."""

    def __init__(self, spec: BilevelSpec, log: IssueLog, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.log = log
        self.device = device
        self.dtype = dtype

    # --- variables -------------------------------------------------------------------------
    def tensor(self, var: TensorVariable, path: str) -> Tensor | None:
        shape = tuple(var.shape)
        kw = {"device": self.device, "dtype": self.dtype}
        size = math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()
        memory = device_memory_bytes(self.device)
        if memory is not None and size > memory:
            self.log.fail(f"{path}.shape", f"shape {list(shape)} takes {size / 2**30:.3g} GiB in {str(self.dtype).removeprefix('torch.')},"
                                           f" more than the {self.device.type} memory of this machine ({memory / 2**30:.3g} GiB)")
            return None
        init = var.init
        if isinstance(init, (int, float)):
            largest = torch.finfo(self.dtype).max
            if abs(float(init)) > largest:
                self.log.fail(f"{path}.init", f"{init} does not fit in {str(self.dtype).removeprefix('torch.')} (largest"
                                              f" magnitude {largest:.7g}); give a smaller value or run.dtype: float64")
                return None
            return torch.full(shape, float(init), **kw)
        if init == "zeros":
            return torch.zeros(shape, **kw)
        if init == "ones":
            return torch.ones(shape, **kw)
        if init == "normal":
            return var.init_scale * torch.randn(shape, **kw)
        if init == "uniform":
            return var.init_scale * (2 * torch.rand(shape, **kw) - 1)
        fn = self.log.ref(init, f"{path}.init")
        if fn is None:
            return None
        try:
            value = torch.as_tensor(fn(**var.init_kwargs), **kw)
        except Exception as exc:  # user code
            self.log.fail_call(exc, init, f"{path}.init", f"{path}.init_kwargs")
            return None
        if tuple(value.shape) != shape:
            self.log.fail(f"{path}.init", f"{init} returned shape {list(value.shape)}, expected {list(shape)}")
            return None
        return value

    def module(self, level: str, vname: str, var: Any, path: str) -> torch.nn.Module | None:
        """The module of a module variable (built by its factory) or of an architecture or
        supernet variable (built from the declared search space)."""
        if not isinstance(var, ModuleVariable):
            try:
                return build_variable_module(self.spec, level, vname, self.log.base_dir)
            except SearchSpaceError as exc:
                self.log.fail(f"{path}{exc.field}", exc.message)
                return None
            except Exception as exc:  # a search space the network cannot be built from
                self.log.fail(path, f"building the {var.kind} variable raised {type(exc).__name__}: {exc}")
                return None
        factory = self.log.ref(var.factory, f"{path}.factory")
        if factory is None:
            return None
        try:
            module = factory(**var.kwargs)
        except Exception as exc:  # user code
            self.log.fail(f"{path}.factory", f"calling {var.factory} raised {type(exc).__name__}: {exc}")
            return None
        if not isinstance(module, torch.nn.Module):
            self.log.fail(f"{path}.factory", f"{var.factory} returned {type(module).__name__}, expected an nn.Module")
            return None
        return module

    def level(self, name: str, spec: LevelSpec, seed: int) -> Level | None:
        base = f"levels.{name}"
        n_before = len(self.log.issues)
        init: list[Tensor] = []
        names: list[str] = []
        tensors: dict[str, int] = {}
        modules: dict[str, ModuleBinding] = {}
        transforms = {}
        sets = []
        proxes = []
        for vname, var in spec.variables.items():
            path = f"{base}.variables.{vname}"
            if isinstance(var, TensorVariable):
                value = self.tensor(var, path)
                if value is None:
                    continue
                value = project_onto(value, var.set)  # start inside the declared set
                tensors[vname] = len(init)
                names.append(vname)
                init.append(value)
                sets.append(var.set)
                proxes.append(build_prox(self.log, var, path))
            elif isinstance(var, HyperparameterVariable):
                transforms[vname], value = make_transform(var, self.device, self.dtype)
                tensors[vname] = len(init)
                names.append(vname)
                init.append(value)
                sets.append(None)  # the range is kept by the transform
                proxes.append(None)
            else:
                module = self.module(name, vname, var, path)
                if module is None:
                    continue
                module = module.to(device=self.device, dtype=self.dtype)
                pnames = tuple(n for n, _ in module.named_parameters())
                modules[vname] = ModuleBinding(module, pnames, len(init))
                constant = getattr(var, "init", None)
                for pname, param in module.named_parameters():
                    names.append(f"{vname}.{pname}")
                    init.append(param.detach().clone() if constant is None else torch.full_like(param.detach(), constant))
                    sets.append(None)
                    proxes.append(None)
        objective = self.log.ref(spec.objective, f"{base}.objective")
        if objective is not None:
            objective = self.log.bind(objective, 3, spec.objective_kwargs, f"{base}.objective", "f(upper, lower, batch)")
        data, share = None, replicated_share(current_world().size)
        if spec.data is not None:
            data, share = self.data(spec, f"{base}.data", seed) or (None, share)
        constraints = []
        for index, cspec in enumerate(spec.constraints):
            path = f"{base}.constraints.{index}"
            fn = self.log.ref(cspec.fn, f"{path}.fn")
            if fn is not None:
                fn = self.log.bind(fn, 3, cspec.kwargs, f"{path}.fn", "c(upper, lower, batch)")
            if fn is not None:
                constraints.append(Constraint(fn, cspec.kind, cspec.coupled, cspec.affine, path))
        solution = None
        if spec.solution is not None:
            if modules:
                self.log.fail(f"{base}.solution", f"a closed-form solution gives tensor variables; {', '.join(modules)}"
                          " is a module variable")
            if current_world().active and spec.data is not None and spec.data.shard:
                self.log.fail(f"{base}.solution", "a closed-form solution would see only this process's shard of the data"
                          " under data parallelism; set data.shard: false for this level or run in one process")
            solution = self.log.ref(spec.solution, f"{base}.solution")
            if solution is not None:
                solution = self.log.bind(solution, 3, spec.solution_kwargs, f"{base}.solution", "f(upper, lower, batch)")
        if len(self.log.issues) > n_before:
            return None
        solver = spec.solver
        if solver is None and solution is not None:
            solver = OptimizerSpec(steps=1)  # nothing steps through it: the closed form replaces the solve
        return Level(
            name=name,
            parent=spec.parent,
            kinds={vname: var.kind for vname, var in spec.variables.items()},
            param_names=tuple(names),
            init=tuple(init),
            objective=objective,
            tensors=tensors,
            modules=modules,
            data=data,
            solver=solver,
            assumptions=spec.assumptions,
            sets=tuple(sets),
            constraints=tuple(constraints),
            share=share,
            solution=solution,
            transforms=transforms,
            proxes=tuple(proxes) if any(p is not None for p in proxes) else (),
        )

    def data(self, spec: LevelSpec, path: str, seed: int) -> tuple[DataStream, float] | None:
        """The level's data stream and this rank's share of the level (its shard under data parallelism)."""
        assert spec.data is not None
        source = self.log.ref(spec.data.source, f"{path}.source")
        if source is None:
            return None
        try:
            raw = source(**spec.data.kwargs)
        except Exception as exc:  # user code
            self.log.fail_call(exc, spec.data.source, f"{path}.source", f"{path}.kwargs")
            return None
        if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
            self.log.fail(f"{path}.source", f"{spec.data.source} returned {type(raw).__name__}, expected a non-empty mapping name -> Tensor")
            return None
        sizes = {k: v.shape[0] if v.dim() else None for k, v in raw.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            self.log.fail(f"{path}.source", f"all tensors need the same first dimension (got {sizes})")
            return None
        world, share = current_world(), replicated_share(current_world().size)
        if world.active and spec.data.shard:  # shard before moving: a rank's device holds its shard only
            try:
                raw, share = shard_rows(raw, world.rank, world.size)
            except ValueError as exc:
                self.log.fail(f"{path}.shard", f"{exc}; use fewer processes, or shard: false to give every process the whole data")
                return None
            seed += 7919 * world.rank  # each shard is shuffled by its own generator
        moved = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in raw.items()
        }
        return DataStream(moved, spec.data.batch_size, seed, spec.data.order), share
