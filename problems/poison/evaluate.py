"""Evaluation of a poisoning study, as report functions: fresh victims trained on the poisoned
training set, against baselines with the same budget, and the outputs a reviewer checks.

``availability_report``: test accuracy of victims trained on (a) the clean set, (b) random
noise uniform in the epsilon ball on the poisoned examples, (c) label flips of the same examples
(each to a random other class), (d) the optimized poisons. ``backdoor_report``: clean test
accuracy and attack success rate (the share of triggered test images of other classes that the
victim assigns to the target class) for the optimized trigger, a fixed corner-patch trigger and a
random-pattern trigger, all with the same epsilon on the same poisoned examples.

Victims: the convex linear model of the lower level, trained to convergence (L-BFGS; its solution
does not depend on the initialization), and ``models`` MLPs from random initializations (how the
poisons transfer to a network the attacker did not simulate).

Both check the budget on what they write and report it: ``max_perturbation`` (largest
|x~ - x| over all pixels), ``poisoned_examples`` (training examples that changed),
``budget_respected``. Files in the run directory: ``poisons.npz`` / ``trigger.npz`` (clean and
poisoned images, indices, budget), ``poisons.png`` / ``trigger.png`` and ``attack.md`` /
``attack.json`` (the table)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from problems.common.data import class_count
from problems.common.models import make_model, seeded
from problems.common.outputs import mean_std, save_image_grid, write_table
from problems.common.training import accuracy, fit_linear, train_model
from problems.poison.budget import PoisonBudget
from problems.poison.data import PoisonData, train
from problems.poison.objectives import apply_perturbation

__all__ = ["availability_report", "backdoor_report", "budget_check", "corner_patch", "train_victims"]


def budget_check(clean: Tensor, poisoned: Tensor, budget: PoisonBudget, tol: float = 1e-6) -> dict[str, Any]:
    """What the poisoned set actually spends of the budget, and whether it stays within it."""
    change = (poisoned - clean).abs().reshape(clean.shape[0], -1).amax(1)
    changed = int((change > 0).sum())
    max_perturbation = float(change.max()) if change.numel() else 0.0
    in_range = bool(poisoned.min() >= 0) and bool(poisoned.max() <= 1)
    respected = max_perturbation <= budget.epsilon + tol and changed <= budget.count(clean.shape[0]) and in_range
    return {"max_perturbation": max_perturbation, "poisoned_examples": changed, "budget_respected": respected,
            "budget_fraction": budget.fraction, "budget_epsilon": budget.epsilon}


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


def _clean_and_budget(data: Mapping[str, Any]) -> tuple[dict[str, Tensor], PoisonBudget, dict[str, Tensor], int]:
    settings = PoisonData.model_validate(dict(data))
    training = train(**data)
    test = settings.split()["test"]
    return training, settings.budget, test, class_count(training["y"], test["y"])


def availability_report(upper: Any, lower: Any, out_dir: Path | None = None, data: Mapping[str, Any] | None = None,
                        mu: float = 1e-2, models: int = 3, noise_seed: int = 0) -> dict[str, Any]:
    """Victims trained on clean / random-noise / label-flip / optimized-poison training sets."""
    training, budget, test, classes = _clean_and_budget(data or {})
    x, y, eps, mask = training["x"], training["y"], training["epsilon"], training["poisoned"]
    delta = upper["delta"].detach().cpu().float().clamp(-1, 1)
    poisoned_x = apply_perturbation(x, delta, eps)
    gen = torch.Generator().manual_seed(noise_seed + 31)
    noise_x = apply_perturbation(x, 2 * torch.rand(x.shape, generator=gen) - 1, eps)
    flipped_y = y.clone()
    index = torch.nonzero(mask).flatten()
    flipped_y[index] = (y[index] + torch.randint(1, classes, (len(index),), generator=gen)) % classes
    variants = {"clean": (x, y), "random noise": (noise_x, y), "label flip": (x, flipped_y), "optimized poisons": (poisoned_x, y)}
    rows = []
    results: dict[str, Any] = {}
    for name, (vx, vy) in variants.items():
        scores = train_victims(vx, vy, test, classes, mu, models)
        results[name.replace(" ", "_")] = scores
        rows.append({"training set": name, "linear victim accuracy": scores["linear_accuracy"],
                     f"MLP victim accuracy ({models} inits)": scores.get("mlp_accuracy", "")})
    check = budget_check(x, poisoned_x, budget)
    out = {**check, **{f"{k}_{m}": v for k, s in results.items() for m, v in s.items()}}
    if out_dir is not None:
        out_dir = Path(out_dir)
        np.savez(out_dir / "poisons.npz", index=index.numpy(), clean=x[index].numpy(), poisoned=poisoned_x[index].numpy(),
                 labels=y[index].numpy(), fraction=budget.fraction, epsilon=budget.epsilon, n_train=x.shape[0])
        shown = index[:10]
        grid = torch.cat([x[shown], poisoned_x[shown], poisoned_x[shown] - x[shown]])
        save_image_grid(grid[: 2 * len(shown)], out_dir / "poisons.png", rows=2, row_labels=["clean", "poisoned"],
                        title=f"availability poisons, fraction {budget.fraction:g}, epsilon {budget.epsilon:g}")
        save_image_grid(grid[2 * len(shown) :], out_dir / "perturbations.png", rows=1, signed=max(budget.epsilon, 1e-8),
                        title=f"perturbations (red +, blue -), |.| <= {budget.epsilon:g}")
        write_table(rows, out_dir, "attack", title=f"Availability poisoning: {check['poisoned_examples']} of {x.shape[0]}"
                    f" training images, epsilon {budget.epsilon:g} (max used {check['max_perturbation']:.4f});"
                    f" data seed {(data or {}).get('seed', 0)}")
    return out


def corner_patch(shape: tuple[int, ...], size: int = 3) -> Tensor:
    """The fixed-pattern trigger: +1 on a size x size patch in the bottom-right corner (scaled by
    epsilon when applied), as in BadNets (Gu et al. 2017)."""
    z = torch.zeros(1, *shape)
    z[..., -size:, -size:] = 1.0
    return z


def backdoor_report(upper: Any, lower: Any, out_dir: Path | None = None, data: Mapping[str, Any] | None = None,
                    mu: float = 1e-2, models: int = 3, patch_size: int = 3, noise_seed: int = 0) -> dict[str, Any]:
    """Clean accuracy and attack success of the optimized, corner-patch and random triggers."""
    data = dict(data or {})
    target = int(data.get("target", 0))
    training, budget, test, classes = _clean_and_budget({**data, "attack": "backdoor"})
    x, y, eps = training["x"], training["y"], training["epsilon"]
    gen = torch.Generator().manual_seed(noise_seed + 37)
    triggers = {
        "optimized trigger": upper["trigger"].detach().cpu().float().clamp(-1, 1),
        "corner patch": corner_patch(tuple(x.shape[1:]), patch_size),
        "random pattern": 2 * torch.rand(1, *x.shape[1:], generator=gen) - 1,
    }
    rows, results = [], {}
    for name, z in triggers.items():
        poisoned_x = apply_perturbation(x, z, eps)
        scores = train_victims(poisoned_x, y, test, classes, mu, models, trigger=z, epsilon=budget.epsilon, target=target)
        results[name.replace(" ", "_")] = scores
        rows.append({"trigger": name, "linear: clean accuracy": scores["linear_accuracy"],
                     "linear: attack success": scores["linear_attack_success"],
                     f"MLP ({models} inits): clean accuracy": scores.get("mlp_accuracy", ""),
                     f"MLP ({models} inits): attack success": scores.get("mlp_attack_success", "")})
    clean_scores = train_victims(x, train(**{**data, "attack": "backdoor", "budget": {"fraction": 0.0, "epsilon": 0.0}})["y"],
                                 test, classes, mu, 0, trigger=triggers["optimized trigger"], epsilon=budget.epsilon, target=target)
    rows.append({"trigger": "none (clean training; optimized trigger at test time)", "linear: clean accuracy": clean_scores["linear_accuracy"],
                 "linear: attack success": clean_scores["linear_attack_success"]})
    optimized = apply_perturbation(x, triggers["optimized trigger"], eps)
    check = budget_check(x, optimized, budget)
    out = {**check, "target": target, **{f"{k}_{m}": v for k, s in results.items() for m, v in s.items()},
           "no_poisoning_linear_attack_success": clean_scores["linear_attack_success"]}
    if out_dir is not None:
        out_dir = Path(out_dir)
        index = torch.nonzero(training["poisoned"]).flatten()
        np.savez(out_dir / "trigger.npz", trigger=(budget.epsilon * triggers["optimized trigger"]).numpy(), index=index.numpy(),
                 clean=x[index].numpy(), poisoned=optimized[index].numpy(), fraction=budget.fraction, epsilon=budget.epsilon,
                 target=target, n_train=x.shape[0])
        patterns = torch.cat([budget.epsilon * z for z in triggers.values()])
        save_image_grid(patterns, out_dir / "trigger.png", rows=1, signed=max(budget.epsilon, 1e-8),
                        title="triggers: optimized, corner patch, random (red +, blue -)")
        sample = test["x"][test["y"] != target][:8]
        examples = torch.cat([apply_perturbation(sample, z, torch.full((len(sample),), budget.epsilon)) for z in triggers.values()])
        save_image_grid(examples, out_dir / "triggered.png", rows=len(triggers), row_labels=["optimized", "patch", "random"],
                        title=f"test images with each trigger (epsilon {budget.epsilon:g})")
        write_table(rows, out_dir, "attack", title=f"Backdoor to class {target}: {check['poisoned_examples']} of {x.shape[0]}"
                    f" training images poisoned, epsilon {budget.epsilon:g}; data seed {data.get('seed', 0)}")
    return out
