"""What the planner knows about a compiled problem: declared assumptions, sizes, variable kinds
and the memory budget. Built from the Problem alone (nothing re-reads the spec); engines read
these facts to configure themselves and to word their reasons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bilevel.nas.memory import supernet_activation_mb
from bilevel.problem import Level, Problem
from bilevel.stn.layers import StnLayer

__all__ = ["DEFAULT_CPU_MEMORY_MB", "ProblemFacts", "memory_budget_mb"]

DEFAULT_CPU_MEMORY_MB = 4096.0


def memory_budget_mb(problem: Problem) -> float:
    """The declared budget (run.budget.memory_mb), or 80% of the free GPU memory, or
    DEFAULT_CPU_MEMORY_MB on CPU."""
    budget = problem.memory_budget_mb
    if budget is None:
        if problem.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(problem.device)
            budget = 0.8 * free / 2**20
        else:
            budget = DEFAULT_CPU_MEMORY_MB
    return float(budget)


def _batch_numel(level: Level) -> int:
    """Scalars of one batch of the level's data (a batch of instances: of all instances together)."""
    if level.data is None:
        return 0
    size = level.data.batch_size or level.data.size
    per_example = getattr(level.data, "example_numel", None)
    return per_example() * size if per_example else sum(v[0].numel() * size for v in level.data.full.values())


@dataclass(frozen=True)
class ProblemFacts:
    """The facts rules and engines read. For more than two levels, the per-level tuples
    describe the chain (top first) and ``lower_*`` fields the level just below the top."""

    upper_level: str
    outer_optimizer: str
    lower_level: str
    lower_convexity: str
    upper_smoothness: str
    constraints: int
    coupled_constraints: int
    tuned_step: tuple[str, ...]
    """Inner-solver hyperparameters that only unrolling differentiates (tuned lr / momentum)."""
    n_upper: int
    n_lower: int
    inner_steps: int
    lower_batch_numel: int
    bytes_per_scalar: int
    memory_mb: float
    device: str
    closed_form: bool = False
    """The lower level declares a closed-form solution (``solution``): it is solved exactly."""
    architecture: tuple[str, ...] = ()
    """Upper variables declared as architecture mixtures ({kind: architecture})."""
    lower_solver: str = "sgd"
    """The lower level's inner solver (sgd, momentum, adam, lbfgs, newton_cg, auto)."""
    inner_tol: float | None = None
    """The lower solver's residual stop (solver.tol; None: a fixed number of steps)."""
    inner_extrapolate: bool = False
    """The lower solver starts at the secant prediction of the next solution (solver.extrapolate)."""
    inner_warm_start: bool = True
    """The lower solver starts at the previous solution (solver.warm_start)."""
    lower_smoothness: str = "unknown"
    """Declared smoothness of the lower objective (bounded: a Lipschitz gradient)."""
    lower_minibatched: bool = False
    """The lower level's batches change from step to step (data.batch_size, or resampled tasks)."""
    activation_mb: float = 0.0
    """Estimated activation memory of one forward/backward of the lower level's supernet on a batch."""
    gradient_free_hyperparameters: tuple[str, ...] = ()
    """Upper hyperparameter variables no gradient reaches: discrete (integer, categorical) or
    declared ``differentiable: false`` (a dropout rate)."""
    discrete_hyperparameters: tuple[str, ...] = ()
    """The integer and categorical ones among them."""
    best_response_model: bool = False
    """The lower level contains STN layers: a model that takes the hyperparameters as input."""
    upper_modules: tuple[str, ...] = ()
    """Module variables of the upper level."""
    continuous_scalars: tuple[str, ...] = ()
    """Upper tensor variables that are continuous scalars (what an engine may draw per example)."""
    instances: int | None = None
    """Independent instances solved as one batch (None: one problem); sizes above are totals."""
    levels: tuple[str, ...] = ()
    """Every level from the top down."""
    sizes: tuple[int, ...] = ()
    """Scalars of each level."""
    level_steps: tuple[int, ...] = ()
    """Inner steps per solve of each level (0 for the top)."""
    convexity: tuple[str, ...] = ()
    """Declared convexity of each level."""
    tuned_step_paths: tuple[str, ...] = ()
    """Dotted paths of every tuned lr / momentum, at any level."""
    steps_per_hypergradient: tuple[int, ...] = ()
    """Optimizer steps each level takes for one nested hypergradient: level k's solve runs the
    levels below it once per step and once more at the end, so counts multiply down the chain."""
    init_from: tuple[str, ...] = ()
    """Dotted paths of the lower level's ``init_from`` (its solves start at upper variables)."""
    prox: bool = False
    """The lower level declares a proximal term tying it to upper variables."""
    tasks: int | None = None
    """Tasks per outer step of a meta-learning problem (None: not one); ``instances`` then counts them."""
    task_share: float = 1.0
    """The fraction of the meta-batch this process adapts: its slice of tasks under a data-parallel
    split (docs/howto/torchrun.md), else 1. Memory estimates count this process's tasks only."""
    shape: str = ""
    """The levels as text ("top -> middle -> bottom", or "top -> (a, b)" for a tree)."""
    lower_sets: tuple[str, ...] = ()
    """Dotted paths of the sets declared on the variables of the levels below the top."""
    prox_operators: tuple[str, ...] = ()
    """Dotted paths of the proximal terms declared on the variables of the levels below the top."""
    blocks: int | None = None
    """m: blocks of the lower level (None: not a level of blocks); ``instances`` then counts them."""
    blocks_sampled: int | None = None
    """k: blocks drawn per outer step, where fewer than all (None: every block every step)."""
    lower_quadratic: bool = False
    """The lower level declares a quadratic objective (``assumptions.quadratic``)."""
    affine_constraints: int = 0
    """How many of the lower level's constraints are declared affine."""
    nested_unrolled_memory_mb: float = 0.0
    """Rough graph memory of nested unrolling: every step stored, each with about four copies
    of its level's variables and activations the size of its batch."""

    @classmethod
    def of(cls, problem: Problem) -> ProblemFacts:
        upper, lower = problem.upper, problem.chain[1]
        chain = problem.chain
        steps = tuple(0 if k == 0 else level.solver.steps for k, level in enumerate(chain))
        counts = [0]
        for k in range(1, len(chain)):  # level k is solved once per step of each ancestor below the top, plus once
            runs = 1
            for a in problem.ancestors(k)[1:]:
                runs *= steps[a] + 1
            counts.append(runs * steps[k])
        bytes_per_scalar = torch.finfo(problem.dtype).bits // 8
        nested = sum(count * bytes_per_scalar * (4 * level.numel + _batch_numel(level)) / 2**20
                     for level, count in zip(chain, counts))
        return cls(
            upper_level=upper.name,
            outer_optimizer=upper.solver.name if upper.solver is not None else "sgd",
            lower_level=lower.name,
            lower_convexity=lower.assumptions.convexity,
            upper_smoothness=upper.assumptions.smoothness,
            constraints=len(lower.constraints),
            coupled_constraints=sum(c.coupled for c in lower.constraints),
            tuned_step=tuple(sorted(k for k in lower.solver.tuned if k != "weight_decay")) if lower.solver else (),
            n_upper=upper.numel,
            n_lower=problem.lower.numel,
            inner_steps=lower.solver.steps if lower.solver else 0,
            lower_batch_numel=_batch_numel(lower),
            bytes_per_scalar=bytes_per_scalar,
            memory_mb=memory_budget_mb(problem),
            device=str(problem.device),
            closed_form=lower.solution is not None,
            lower_solver=lower.solver.name if lower.solver is not None else "sgd",
            inner_tol=lower.solver.tol if lower.solver is not None else None,
            inner_extrapolate=bool(lower.solver.extrapolate) if lower.solver is not None else False,
            inner_warm_start=bool(lower.solver.warm_start) if lower.solver is not None else True,
            lower_smoothness=lower.assumptions.smoothness,
            lower_minibatched=lower.data is not None and (lower.data.batch_size is not None
                                                          or bool(getattr(lower.data, "resampled", False))),
            **_architecture_facts(problem),
            gradient_free_hyperparameters=tuple(n for n, t in upper.transforms.items() if t.gradient_free),
            discrete_hyperparameters=tuple(n for n, t in upper.transforms.items() if t.discrete),
            best_response_model=any(isinstance(m, StnLayer) for b in lower.modules.values() for m in b.module.modules()),
            upper_modules=tuple(upper.modules),
            continuous_scalars=tuple(n for n, i in upper.tensors.items()
                                     if not upper.transform(n).discrete and upper.init[i].numel() == 1),
            instances=problem.instances,
            levels=problem.level_names,
            sizes=tuple(level.numel for level in chain),
            level_steps=steps,
            convexity=tuple(level.assumptions.convexity for level in chain),
            tuned_step_paths=tuple(f"levels.{level.name}.solver.tuned.{hyper}" for level in chain[1:]
                                   for hyper in (level.solver.tuned if level.solver else {}) if hyper != "weight_decay"),
            steps_per_hypergradient=tuple(counts),
            init_from=(f"levels.{lower.name}.init_from",) if lower.init_from else (),
            prox=lower.prox is not None,
            tasks=problem.instances if problem.resamples_tasks else None,
            task_share=_task_share(problem),
            blocks=problem.blocks.count if problem.blocks is not None else None,
            blocks_sampled=(problem.blocks.sample if problem.blocks is not None and not problem.blocks.every_block
                            else None),
            lower_quadratic=lower.assumptions.quadratic,
            affine_constraints=sum(c.affine for c in lower.constraints),
            nested_unrolled_memory_mb=nested,
            shape=problem.shape,
            **_nonsmooth_facts(chain[1:]),
        )

    @property
    def blocks_path(self) -> str:
        return f"levels.{self.lower_level}.blocks"

    @property
    def depth(self) -> int:
        return len(self.levels)

    @property
    def chain(self) -> str:
        """The levels as "top -> middle -> bottom" (a tree: "top -> (a, b)")."""
        return self.shape or " -> ".join(self.levels)

    @property
    def is_chain(self) -> bool:
        return "(" not in self.chain

    @property
    def lower_convexities(self) -> tuple[str, ...]:
        """The declared convexity of every level below the top."""
        return self.convexity[1:]

    def unrolled_memory_mb(self, stored_steps: int) -> float:
        """Rough graph memory of differentiating through ``stored_steps`` inner steps: each keeps
        the iterate, its gradient and optimizer buffers (~4 copies of y) and activations at least
        the size of the lower batch; of this process's tasks only, under a data-parallel split."""
        per_step = self.bytes_per_scalar * (4 * self.n_lower + self.lower_batch_numel) * self.task_share
        return stored_steps * per_step / 2**20

    def nested_steps(self) -> str:
        """The optimizer steps of one nested hypergradient, in total and per lower level."""
        parts = [f"{count} at {name}" for name, count in zip(self.levels[1:], self.steps_per_hypergradient[1:])]
        return f"{sum(self.steps_per_hypergradient)} ({', '.join(parts)})"


def _task_share(problem: Problem) -> float:
    """This process's fraction of the meta-batch (1 outside a data-parallel split of tasks): the
    slice ``StackedInstances.own_rows`` evaluates."""
    rows = None if problem.stacked is None else problem.stacked.own_rows()
    return 1.0 if rows is None else (rows[1] - rows[0]) / problem.stacked.count


def _nonsmooth_facts(below: tuple[Level, ...]) -> dict[str, Any]:
    """The sets and proximal terms of the levels below the top, at their dotted paths."""
    sets: list[str] = []
    proxes: list[str] = []
    for level in below:
        base = f"levels.{level.name}.variables"
        for name, i in level.tensors.items():
            if level.sets and level.sets[i] is not None:
                sets.append(f"{base}.{name}.set")
            if level.proxes and level.proxes[i] is not None:
                proxes.append(f"{base}.{name}.prox")
    return {"lower_sets": tuple(sets), "prox_operators": tuple(proxes)}


def _architecture_facts(problem: Problem) -> dict[str, Any]:
    upper = problem.upper
    names = tuple(n for n, kind in upper.kinds.items() if kind == "architecture")
    if not names:
        return {}
    return {"architecture": names, "activation_mb": supernet_activation_mb(problem)}
