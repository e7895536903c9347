"""Evaluation of a poisoning study, as report functions: fresh victims trained on the poisoned
training set, against baselines with the same budget, and the outputs a reviewer checks.

``availability_report``: test accuracy of victims trained on (a) the clean set, (b) random noise
on the poisoned examples, uniform in the epsilon ball, (c) random noise of random signs, +-epsilon
on every pixel (the stronger random baseline: it spends the whole budget, as the usual random
baseline of the poisoning literature does), (d) label flips of the same examples (each to a
random other class), (e) the optimized poisons. ``backdoor_report``: clean test accuracy and
attack success rate (the share of triggered test images of other classes that the victim assigns
to the target class) for the optimized trigger and three fixed triggers, all with the same
epsilon on the same poisoned examples: the BadNets corner patch (Gu et al. 2017; +epsilon on a
3x3 corner, 9 pixels), and two that spend the L-infinity budget on every pixel, a checkerboard
and a random sign pattern, each +-epsilon.

Victims: the convex linear model of the lower level, trained to convergence (L-BFGS; its solution
does not depend on the initialization), and ``models`` MLPs from random initializations (how the
poisons transfer to a network the attacker did not simulate).

``data`` is the report's copy of the data sources' arguments (:class:`PoisonData`, declared once
in a preset with a YAML anchor); it is validated at ``report_kwargs.data`` and checked against
the run's upper variable. Both reports measure the budget on what they write and report it:
``max_perturbation`` (largest |x~ - x| over all pixels), ``poisoned_examples`` (training examples
whose image or label changed), ``budget_respected``. Files in the run directory:
``poisons.npz`` / ``trigger.npz`` (the whole poisoned training set as the victim trains on it,
``poisoned_x`` and ``poisoned_y``, with the data settings and the budget, so that the budget can
be checked against clean data loaded independently), ``poisons.png`` / ``trigger.png`` and
``attack.md`` / ``attack.json`` (the table)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from bilevel.spec.errors import SpecError
from bilevel.spec.load import validation_issues
from problems.common.data import class_count
from problems.common.models import make_model, seeded
from problems.common.outputs import mean_std, save_image_grid, write_table
from problems.common.training import accuracy, fit_linear, train_model
from problems.poison.budget import PoisonBudget
from problems.poison.data import PoisonData, training_set
from problems.poison.objectives import apply_perturbation

__all__ = [
    "AVAILABILITY_ROWS",
    "BACKDOOR_ROWS",
    "availability_report",
    "backdoor_report",
    "budget_check",
    "checkerboard",
    "corner_patch",
    "random_pattern",
    "train_victims",
]

AVAILABILITY_ROWS = {
    "clean": "clean",
    "random_uniform": "random noise, uniform in the ε-ball",
    "random_signs": "random noise, ±ε signs",
    "label_flip": "label flip",
    "optimized_poisons": "optimized poisons",
}
"""The training sets of ``availability_report``: result key prefix -> table label."""
BACKDOOR_ROWS = {
    "optimized_trigger": "optimized trigger",
    "corner_patch": "corner patch (BadNets, 3x3)",
    "checkerboard": "checkerboard ±ε (every pixel)",
    "random_signs": "random signs ±ε (every pixel)",
}
"""The triggers of ``backdoor_report``: result key prefix -> table label."""


def budget_check(clean_x: Tensor, clean_y: Tensor, poisoned_x: Tensor, poisoned_y: Tensor, budget: PoisonBudget,
                 tol: float = 1e-6) -> dict[str, Any]:
    """What a poisoned training set actually spends of the budget, and whether it stays within
    it: at most round(fraction n) examples changed (image or label), no pixel changed by more
    than epsilon, every pixel in [0, 1]."""
    change = (poisoned_x - clean_x).abs().reshape(clean_x.shape[0], -1).amax(1)
    changed = int(((change > 0) | (poisoned_y != clean_y)).sum())
    max_perturbation = float(change.max()) if change.numel() else 0.0
    in_range = bool(poisoned_x.min() >= 0) and bool(poisoned_x.max() <= 1)
    respected = max_perturbation <= budget.epsilon + tol and changed <= budget.count(clean_x.shape[0]) and in_range
    return {"max_perturbation": max_perturbation, "poisoned_examples": changed, "budget_respected": respected,
            "budget_fraction": budget.fraction, "budget_epsilon": budget.epsilon}


def random_pattern(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> Tensor:
    """Random noise in the unit box, scaled by epsilon when applied: ``uniform`` in [-1, 1] per
    pixel, or ``signs``, +-1 per pixel with probability 1/2 each (the corners of the L-infinity
    ball: the whole budget on every pixel)."""
    if kind == "uniform":
        return 2 * torch.rand(shape, generator=generator) - 1
    if kind == "signs":
        return torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    raise ValueError(f"unknown noise {kind!r}; expected 'uniform' or 'signs'")


def train_victims(x: Tensor, y: Tensor, test: Mapping[str, Tensor], classes: int, mu: float, models: int,
                  mlp_steps: int = 300, trigger: Tensor | None = None, epsilon: float = 0.0, target: int = 0) -> dict[str, Any]:
    """Clean test accuracy (and with ``trigger`` the attack success rate) of the linear victim
    trained to convergence and of ``models`` MLPs from random initializations."""
    test_x, test_y = test["x"].to(x), test["y"].to(x.device)
    others = test_y != target
    triggered = None if trigger is None else apply_perturbation(test_x[others], trigger, torch.full((int(others.sum()),), epsilon).to(x))

    def scores(net: torch.nn.Module) -> dict[str, float]:
        out = {"accuracy": accuracy(net, test_x, test_y)}
        if triggered is not None:
            out["attack_success"] = accuracy(net, triggered, torch.full((triggered.shape[0],), target, device=x.device))
        return out

    linear = scores(fit_linear(x, y, classes, mu))
    networks = []
    for index in range(models):
        net = seeded(2000 + index, make_model, "mlp", x.shape[1:], classes).to(x)
        networks.append(scores(train_model(net, x, y, steps=mlp_steps, seed=index)))
    out: dict[str, Any] = {f"linear_{k}": v for k, v in linear.items()}
    for key in networks[0] if networks else []:
        out[f"mlp_{key}"] = mean_std([n[key] for n in networks])
    return out


def _settings(data: PoisonData | Mapping[str, Any] | None, attack: str) -> PoisonData:
    """The report's copy of the data arguments, validated as the data sources validate theirs; a
    bad value is a SpecError at its dotted path under ``report_kwargs.data`` (exit code 2). From a
    spec the check has already run at compile time (the reports annotate ``data`` with
    :class:`PoisonData`); this one covers direct calls."""
    if isinstance(data, PoisonData):
        settings = data
    else:
        given = dict(data or {})
        try:
            settings = PoisonData.model_validate(given)
        except ValidationError as exc:
            raise SpecError(validation_issues(exc, given, "<report>", prefix=("report_kwargs", "data"))) from None
    if settings.attack != attack:
        raise SpecError.single("<report>", "report_kwargs.data.attack", f"the {attack} report got attack {settings.attack!r};"
                               f" expected {attack!r}, as in the data sources' arguments")
    return settings


def _mismatch(variable: str, got: Tensor, expected: list[int]) -> SpecError:
    return SpecError.single("<report>", "report_kwargs.data", f"describes a training set for which {variable} would have shape"
                            f" {expected}, but the run's {variable} has shape {list(got.shape)}: the report's data arguments"
                            " must be those of levels.lower.data.kwargs (declare them once with a YAML anchor, or replace"
                            " report_kwargs.data whole with the same values)")


def _write_poisons(path: Path, settings: PoisonData, training: Mapping[str, Tensor], poisoned_x: Tensor, poisoned_y: Tensor,
                   **extra: Any) -> None:
    """The whole poisoned training set and what an independent check needs to rebuild the clean one."""
    np.savez(path, poisoned_x=poisoned_x.numpy(), poisoned_y=poisoned_y.numpy(),
             index=torch.nonzero(training["poisoned"]).flatten().numpy(), fraction=settings.budget.fraction,
             epsilon=settings.budget.epsilon, dataset=settings.dataset, path=settings.path or "", n_train=settings.n_train,
             n_val=settings.n_val, seed=settings.seed, attack=settings.attack, **extra)


def availability_report(upper: Any, lower: Any, out_dir: Path | None = None, data: PoisonData | None = None,
                        mu: float = 1e-2, models: int = 3, noise_seed: int = 0) -> dict[str, Any]:
    """Victims trained on the clean set, on random noise (uniform in the epsilon ball, and random
    +-epsilon signs) on the poisoned examples, on label flips of those examples, and on the
    optimized poisons (the rows of :data:`AVAILABILITY_ROWS`)."""
    settings = _settings(data, "availability")
    split = settings.split()
    budget, training, test = settings.budget, training_set(settings, split), split["test"]
    x, y, eps, mask = training["x"], training["y"], training["epsilon"], training["poisoned"]
    classes = class_count(y, test["y"])
    delta = upper["delta"].detach().cpu().float()
    if list(delta.shape) != list(x.shape):
        raise _mismatch("delta", delta, list(x.shape))
    poisoned_x = apply_perturbation(x, delta.clamp(-1, 1), eps)
    gen = torch.Generator().manual_seed(noise_seed + 31)
    uniform_x = apply_perturbation(x, random_pattern(tuple(x.shape), "uniform", gen), eps)
    flipped_y = y.clone()
    index = torch.nonzero(mask).flatten()
    flipped_y[index] = (y[index] + torch.randint(1, classes, (len(index),), generator=gen)) % classes
    signs_x = apply_perturbation(x, random_pattern(tuple(x.shape), "signs", gen), eps)
    variants = {"clean": (x, y), "random_uniform": (uniform_x, y), "random_signs": (signs_x, y), "label_flip": (x, flipped_y),
                "optimized_poisons": (poisoned_x, y)}
    rows = []
    results: dict[str, Any] = {}
    for key, (vx, vy) in variants.items():
        scores = train_victims(vx, vy, test, classes, mu, models)
        results[key] = scores
        rows.append({"training set": AVAILABILITY_ROWS[key], "linear victim accuracy": scores["linear_accuracy"],
                     f"MLP victim accuracy ({models} inits)": scores.get("mlp_accuracy", "")})
    check = budget_check(x, y, poisoned_x, y, budget)
    out = {**check, **{f"{k}_{m}": v for k, s in results.items() for m, v in s.items()}}
    if out_dir is not None:
        out_dir = Path(out_dir)
        _write_poisons(out_dir / "poisons.npz", settings, training, poisoned_x, y)
        shown = index[:10]
        grid = torch.cat([x[shown], poisoned_x[shown], poisoned_x[shown] - x[shown]])
        save_image_grid(grid[: 2 * len(shown)], out_dir / "poisons.png", rows=2, row_labels=["clean", "poisoned"],
                        title=f"availability poisons, fraction {budget.fraction:g}, epsilon {budget.epsilon:g}")
        save_image_grid(grid[2 * len(shown) :], out_dir / "perturbations.png", rows=1, signed=max(budget.epsilon, 1e-8),
                        title=f"perturbations (red +, blue -), |.| <= {budget.epsilon:g}")
        write_table(rows, out_dir, "attack", title=f"Availability poisoning: {check['poisoned_examples']} of {x.shape[0]}"
                    f" training images, epsilon {budget.epsilon:g} (max used {check['max_perturbation']:.4f});"
                    f" data seed {settings.seed}")
    return out


def corner_patch(shape: tuple[int, ...], size: int = 3) -> Tensor:
    """The BadNets trigger (Gu et al. 2017): +1 on a size x size patch in the bottom-right corner,
    0 elsewhere (scaled by epsilon when applied)."""
    z = torch.zeros(1, *shape)
    z[..., -size:, -size:] = 1.0
    return z


def checkerboard(shape: tuple[int, ...]) -> Tensor:
    """A fixed trigger over the whole image: +1 where row + column is even, -1 elsewhere (scaled
    by epsilon when applied, so it spends the L-infinity budget on every pixel)."""
    rows = torch.arange(shape[-2]).reshape(-1, 1)
    cols = torch.arange(shape[-1]).reshape(1, -1)
    board = torch.where((rows + cols) % 2 == 0, 1.0, -1.0)
    return board.expand(1, *shape).clone()


def backdoor_report(upper: Any, lower: Any, out_dir: Path | None = None, data: PoisonData | None = None,
                    mu: float = 1e-2, models: int = 3, patch_size: int = 3, noise_seed: int = 0) -> dict[str, Any]:
    """Clean accuracy and attack success of the optimized trigger and of the fixed triggers of
    :data:`BACKDOOR_ROWS`, and of the optimized trigger on a victim trained on clean data."""
    settings = _settings(data, "backdoor")
    budget, target = settings.budget, settings.target
    split = settings.split()
    training, test = training_set(settings, split), split["test"]
    x, y, eps = training["x"], training["y"], training["epsilon"]
    clean_y = split["train"]["y"]
    classes = class_count(y, test["y"])
    optimized = upper["trigger"].detach().cpu().float()
    if list(optimized.shape) != [1, *x.shape[1:]]:
        raise _mismatch("trigger", optimized, [1, *x.shape[1:]])
    gen = torch.Generator().manual_seed(noise_seed + 37)
    shape = tuple(x.shape[1:])
    triggers = {
        "optimized_trigger": optimized.clamp(-1, 1),
        "corner_patch": corner_patch(shape, patch_size),
        "checkerboard": checkerboard(shape),
        "random_signs": random_pattern((1, *shape), "signs", gen),
    }
    rows, results = [], {}
    for key, z in triggers.items():
        scores = train_victims(apply_perturbation(x, z, eps), y, test, classes, mu, models, trigger=z, epsilon=budget.epsilon,
                               target=target)
        results[key] = scores
        rows.append({"trigger": BACKDOOR_ROWS[key], "linear: clean accuracy": scores["linear_accuracy"],
                     "linear: attack success": scores["linear_attack_success"],
                     f"MLP ({models} inits): clean accuracy": scores.get("mlp_accuracy", ""),
                     f"MLP ({models} inits): attack success": scores.get("mlp_attack_success", "")})
    clean_scores = train_victims(x, clean_y, test, classes, mu, 0, trigger=triggers["optimized_trigger"], epsilon=budget.epsilon,
                                 target=target)
    rows.append({"trigger": "none (clean training; optimized trigger at test time)", "linear: clean accuracy": clean_scores["linear_accuracy"],
                 "linear: attack success": clean_scores["linear_attack_success"]})
    poisoned_x = apply_perturbation(x, triggers["optimized_trigger"], eps)
    check = budget_check(x, clean_y, poisoned_x, y, budget)
    out = {**check, "target": target, **{f"{k}_{m}": v for k, s in results.items() for m, v in s.items()},
           "no_poisoning_linear_attack_success": clean_scores["linear_attack_success"]}
    if out_dir is not None:
        out_dir = Path(out_dir)
        _write_poisons(out_dir / "trigger.npz", settings, training, poisoned_x, y,
                       trigger=(budget.epsilon * triggers["optimized_trigger"]).numpy(), target=target)
        patterns = torch.cat([budget.epsilon * z for z in triggers.values()])
        save_image_grid(patterns, out_dir / "trigger.png", rows=1, signed=max(budget.epsilon, 1e-8),
                        title="triggers: optimized, corner patch, checkerboard, random signs (red +, blue -)")
        sample = test["x"][test["y"] != target][:8]
        examples = torch.cat([apply_perturbation(sample, z, torch.full((len(sample),), budget.epsilon)) for z in triggers.values()])
        save_image_grid(examples, out_dir / "triggered.png", rows=len(triggers),
                        row_labels=["optimized", "patch", "checkerboard", "random signs"],
                        title=f"test images with each trigger (epsilon {budget.epsilon:g})")
        write_table(rows, out_dir, "attack", title=f"Backdoor to class {target}: {check['poisoned_examples']} of {x.shape[0]}"
                    f" training images poisoned, epsilon {budget.epsilon:g}; data seed {settings.seed}")
    return out
