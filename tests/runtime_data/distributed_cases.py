"""Hypergradient cases computed both in one process and on 2 gloo ranks (tests/test_distributed.py):
the same code runs in the test process and in each spawned rank."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from bilevel import build_engine, compile_spec
from bilevel.engines import BORepConfig, DartsConfig, ImplicitConfig, LVHBAConfig, PenaltyConfig, RartsConfig, StnConfig, UnrolledConfig
from bilevel.spec import spec_from_data
from problems.toy import ridge_spec

HERE = Path(__file__).resolve().parent
CALLS = 3  # hypergradient calls per case, carrying the engine state (warm starts, single-loop state)


def ridge(**solver: Any) -> dict:
    """Ridge with per-feature L2 strengths; 41 training and 41 validation examples: shards of 21 and 20."""
    data = ridge_spec(n=41, d=6, inner_steps=40, inner_lr=0.1).model_dump(mode="json")
    data["levels"]["lower"]["solver"].update(warm_start=True, **solver)
    return data


def ridge_tuned_lr() -> dict:
    """The inner learning rate is an upper variable (differentiated through the momentum optimizer)."""
    data = ridge(name="momentum", momentum=0.5, steps=12)
    data["levels"]["upper"]["variables"]["inner_lr"] = {"shape": [], "init": 0.1}
    data["levels"]["lower"]["solver"]["tuned"] = {"lr": "inner_lr"}
    return data


def ridge_constrained() -> dict:
    data = ridge()
    data["levels"]["lower"]["constraints"] = [{"fn": f"{HERE / 'ridge_constraint.py'}:constraint", "kind": "inequality"}]
    data["levels"]["lower"]["assumptions"]["convexity"] = "convex"
    return data


def mixed_ridge() -> dict:
    """Architecture weights over two operations on the ridge data (runtime_data/mixed_ridge.py), for
    DARTS and RARTS: 10 warm-started weight steps per outer step."""
    data = ridge(steps=10)
    module = str(HERE / "mixed_ridge.py")
    data["levels"]["upper"]["variables"] = {"alpha": {"shape": [2], "init": "normal", "init_scale": 0.5}}
    data["levels"]["upper"]["objective"] = f"{module}:upper"
    data["levels"]["lower"]["objective"] = f"{module}:lower"
    return data


def hyperclean(batch_size: int | None = None) -> dict:
    """Per-example weights indexed by the data's global "index" column (31 examples: shards 16 / 15)."""
    kwargs = {"dataset": "mixture", "n_train": 31, "n_val": 25, "d": 5, "classes": 3, "seed": 1}
    return {
        "name": "hyperclean-small",
        "levels": {
            "upper": {
                "variables": {"lam": {"shape": [31], "init": "normal", "init_scale": 0.5}},
                "objective": "problems.hyperclean:upper_objective",
                "data": {"source": "problems.hyperclean:val_data", "kwargs": kwargs},
                "solver": {"name": "sgd", "lr": 1.0},
            },
            "lower": {
                "parent": "upper",
                "variables": {"W": {"shape": [3, 5]}, "b": {"shape": [3]}},
                "objective": "problems.hyperclean:lower_objective",
                "objective_kwargs": {"mu": 0.1},
                "data": {"source": "problems.hyperclean:train_data", "kwargs": kwargs, "batch_size": batch_size},
                "solver": {"name": "sgd", "lr": 0.2, "steps": 30, "warm_start": True},
                "assumptions": {"convexity": "strongly_convex"},
            },
        },
        "run": {"device": "cpu", "dtype": "float64", "seed": 0},
    }


def stn_ridge_case() -> dict:
    """A best-response model downstairs (runtime_data/stn_ridge.py) with a tuned weight decay (pathwise
    gradient) and an integer number of active features (REINFORCE and its baseline). Both ranks draw
    the same perturbations: the run seeds them alike and the objectives draw no random numbers."""
    from runtime_data import stn_ridge

    return stn_ridge.spec(n=41, d=6, wd=1e-2, k=4)


def maml(meta_batch: int = 5, reduce: str = "mean", **kwargs: Any) -> dict:
    """MAML on quadratic tasks (problems/meta/quadratic.py): every rank draws the whole meta-batch
    and evaluates its slice of the tasks (5 tasks: 3 on rank 0, 2 on rank 1)."""
    from problems.meta.quadratic import task_spec

    data = task_spec(steps=2, meta_batch=meta_batch, **kwargs)
    data["tasks"]["reduce"] = reduce
    return data


def imaml() -> dict:
    from problems.meta.quadratic import task_spec

    return task_spec(steps=30, prox=2.0)


META_CASES = ("maml", "maml-3-tasks", "maml-sum", "metasgd", "fomaml", "imaml")
"""The meta-learning cases: the meta-batch split over the ranks."""


CASES: dict[str, tuple[Any, Any]] = {
    "implicit-cg": (ridge, ImplicitConfig(linear_solver={"method": "cg", "maxiter": 8, "tol": 0.0})),
    "implicit-neumann": (ridge, ImplicitConfig(linear_solver={"method": "neumann", "maxiter": 8, "neumann_lr": 0.1})),
    "implicit-direct": (ridge, ImplicitConfig(linear_solver={"method": "direct"})),
    "implicit-forward-hvp": (ridge, ImplicitConfig(hvp="forward", linear_solver={"method": "cg", "maxiter": 8, "tol": 0.0})),
    "unrolled": (ridge, UnrolledConfig()),
    "unrolled-checkpointed": (ridge, UnrolledConfig(checkpoint_every=7)),
    "unrolled-truncated": (ridge, UnrolledConfig(truncate=9)),
    "unrolled-tuned-lr-checkpointed": (ridge_tuned_lr, UnrolledConfig(checkpoint_every=5)),
    "penalty": (ridge, PenaltyConfig(gamma_init=1.0, gamma_max=10.0, gamma_ramp_steps=2)),
    "bo_rep": (ridge, BORepConfig(lower_steps=5, update_every=1)),
    "lv_hba": (ridge_constrained, LVHBAConfig()),
    "darts-first-order": (mixed_ridge, DartsConfig(order=1)),
    "darts": (mixed_ridge, DartsConfig(order=2, eigen_every=1, eigen_iters=5)),
    "darts-exact-hessian": (mixed_ridge, DartsConfig(order=2, hessian="exact")),
    "rarts": (mixed_ridge, RartsConfig(beta=2.0)),
    "hyperclean-implicit": (hyperclean, ImplicitConfig(linear_solver={"method": "cg", "maxiter": 10, "tol": 0.0})),
    "hyperclean-unrolled": (hyperclean, UnrolledConfig(checkpoint_every=10)),
    "stn": (stn_ridge_case, StnConfig()),
    "maml": (maml, UnrolledConfig()),
    "maml-3-tasks": (lambda: maml(meta_batch=3), UnrolledConfig()),  # slices of 2 and 1
    "maml-sum": (lambda: maml(reduce="sum"), UnrolledConfig(checkpoint_every=1)),
    "metasgd": (lambda: maml(per_entry_lr=True), UnrolledConfig()),
    "fomaml": (maml, UnrolledConfig(first_order=True)),
    "imaml": (imaml, ImplicitConfig(linear_solver={"method": "cg", "maxiter": 4, "tol": 0.0})),
}


def hypergradients(name: str) -> dict[str, list[torch.Tensor]]:
    """CALLS hypergradients at the initial upper variables, the engine state carried between calls:
    each call's direction, upper loss, inner residual, lower solution and extra statistics."""
    build, config = CASES[name]
    problem = compile_spec(spec_from_data(build()))
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    out: dict[str, list[torch.Tensor]] = {"grad": [], "loss": [], "residual": [], "lower": [], "extra": []}
    for _ in range(CALLS):
        result = engine.hypergrad(problem, x, state, problem.upper.batch())
        state = result.state
        out["grad"].append(torch.cat([g.reshape(-1) for g in result.grad]))
        out["loss"].append(result.upper_loss.reshape(1))
        out["residual"].append(result.stats.inner_residual.reshape(1))
        out["lower"].append(torch.cat([p.reshape(-1) for p in state.lower]))
        # an engine's own statistics (DARTS's Hessian eigenvalue, RARTS's weight gap), by name
        out["extra"].append(torch.tensor([float(v) for _, v in sorted(result.stats.extra.items())], dtype=torch.float64))
    return {k: [t.detach().clone() for t in v] for k, v in out.items()}


def all_cases() -> dict[str, dict[str, list[torch.Tensor]]]:
    return {name: hypergradients(name) for name in CASES}


def minibatch_indices() -> list[int]:
    """The global example indices this rank draws in one epoch of minibatches of 4."""
    problem = compile_spec(spec_from_data(hyperclean(batch_size=4)))
    stream = problem.lower.data
    drawn: list[int] = []
    for _ in range(stream.size // 4):
        drawn += stream.next()["index"].tolist()
    return drawn


def killable_ridge(steps: int, delay: float) -> dict:
    """Ridge with a slowed-down upper objective and lower minibatches (each rank's stream state
    must survive a resume): a run a test can kill mid-way."""
    data = ridge(steps=10)
    module = str(HERE / "slow_ridge.py")
    data["levels"]["upper"]["objective"] = f"{module}:upper"
    data["levels"]["upper"]["objective_kwargs"] = {"delay": delay}
    data["levels"]["upper"]["solver"] = {"name": "momentum", "lr": 0.05}
    data["levels"]["lower"]["objective"] = f"{module}:lower"
    data["levels"]["lower"]["data"]["batch_size"] = 8
    data["run"].update(steps=steps, checkpoint_every=1)
    return data


KILLABLE_STEPS = 30


def reference_run(out: Path) -> dict:
    """The uninterrupted run of killable_ridge (no delay: it changes nothing but the time)."""
    from bilevel import run

    result = run(spec_from_data(killable_ridge(KILLABLE_STEPS, 0.0)), out=out, progress=False)
    metrics = (out / "metrics.jsonl").read_text() if out.exists() else None
    return {"result": json.loads(json.dumps(result.result)), "metrics": metrics}


def closed_form_error() -> str:
    """The error compiling a closed-form lower level over sharded data gives (it would see a shard)."""
    from bilevel import SpecError, compile_spec
    from bilevel.spec import spec_from_data
    from problems.toy import ridge_spec

    data = ridge_spec(inner_steps=3).model_dump(mode="json")
    data["levels"]["lower"]["solution"] = "runtime_data/closed_form.py:solution"
    del data["levels"]["lower"]["solver"]
    try:
        compile_spec(spec_from_data(data, base_dir=Path(__file__).resolve().parent.parent))
    except SpecError as exc:
        return str(exc)
    return ""


def chain_error() -> str:
    """The error compiling a three-level chain in a data-parallel run gives."""
    from bilevel import SpecError, compile_spec, load_spec
    from bilevel.presets import find_preset

    try:
        compile_spec(load_spec(find_preset("toy/three_level")))
    except SpecError as exc:
        return str(exc)
    return ""


def task_values(meta_batch: int) -> dict[str, torch.Tensor]:
    """The per-task values the stacked objectives evaluate in this process at the initial point of
    a first meta-batch (a data-parallel rank: its slice's only), and the objectives themselves."""
    problem = compile_spec(spec_from_data(maml(meta_batch=meta_batch)))
    x = problem.fresh(problem.upper.init)
    y = problem.initial_lower(x)
    query, support = problem.upper.data.next(), problem.lower.data.next()
    return {"query": problem.stacked.per_instance(0, [x, y], query), "support": problem.stacked.per_instance(1, [x, y], support),
            "F": problem.upper_objective(x, y, query).reshape(1), "G": problem.lower_objective(x, y, support).reshape(1)}


def meta_batch_error() -> str:
    """The error compiling a meta-batch of one task for 2 processes gives."""
    from bilevel import SpecError

    try:
        compile_spec(spec_from_data(maml(meta_batch=1)))
    except SpecError as exc:
        return str(exc)
    return ""


def replica_checks(out_dir: Path) -> dict[str, Any]:
    """Checkpoints of replicated state that agrees, then differs, across ranks (one entry of the
    upper variable is off by 1e-9 on rank 1): the errors raised and, on rank 0, what was left on disk."""
    from bilevel.distributed import ReplicaMismatch, check_replicas, current_world
    from bilevel.runtime.checkpoint import save_snapshot

    rank = current_world().rank
    x = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)
    local = {"rng": torch.full((2,), float(rank))}  # per-rank state may differ
    checked: dict[str, Any] = {}
    check_replicas([x, torch.ones(3)], "identical tensors")  # agreeing replicas pass
    save_snapshot(out_dir, {"step": 1, "x": [x]}, local)
    diverged = x.clone()
    if rank == 1:
        diverged[3] += 1e-9
    try:
        save_snapshot(out_dir, {"step": 2, "x": [diverged]}, local)
    except ReplicaMismatch as exc:
        checked["error"] = str(exc)
    try:
        check_replicas([torch.ones(3), diverged], "diverged tensors")
    except ReplicaMismatch as exc:
        checked["check_error"] = str(exc)
    if rank == 0:  # the writer: what the directory holds now
        checked["files"] = sorted(path.name for path in out_dir.iterdir())
        checked["saved"] = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    return checked


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank: join the gloo group, compute every case and a reference run, save the results."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from bilevel.distributed import data_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with data_parallel(torch.device("cpu")) as (world, _):
            assert world.size == world_size and world.rank == rank
            results: dict[str, Any] = {"cases": all_cases(), "indices": minibatch_indices(),
                                       "closed_form_error": closed_form_error(), "chain_error": chain_error(),
                                       "tasks": {m: task_values(m) for m in (5, 3)}, "meta_batch_error": meta_batch_error()}
            results["run"] = reference_run(Path(out_dir) / f"run-rank{rank}")
            results["replicas"] = replica_checks(Path(out_dir) / "replicas")
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
