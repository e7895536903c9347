"""Evaluation of a contrastive backdoor (Sun et al. 2024, BLTO): fresh SimCLR victims trained on
the poisoned images, measured by a linear probe.

A victim is an encoder trained by SimCLR (``problems.poison.contrastive``) from a random
initialization on the training images, of which the poisoned ones (images of the target class)
carry a trigger; no labels are used. Downstream, a linear probe (softmax regression on the
standardized features f(x), L2 weight mu, trained to convergence by L-BFGS) is fitted on the clean
labeled training images. Clean accuracy: the probe on the clean test images. Attack success: the
share of triggered test images of other classes that the probe assigns to the target class.

Triggers compared at the same budget (the same poisoned images, the same epsilon): the optimized
one, the BadNets corner patch (Gu et al. 2017; +epsilon on a 3x3 corner), and two fixed patterns
on every pixel, a checkerboard and random signs (+-epsilon); and the optimized trigger against a
victim trained on clean images (no poisoning), which tells a backdoor from an adversarial
perturbation. ``contrastive_attack`` evaluates any trigger (the comparison script evaluates the
trigger optimized through the supervised victim with it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from problems.common.data import class_count
from problems.common.models import seeded
from problems.common.outputs import mean_std, save_image_grid, write_table
from problems.common.training import accuracy, fit_linear
from problems.poison.contrastive import contrastive_encoder, encoder_features, train_contrastive
from problems.poison.data import PoisonData, training_set
from problems.poison.evaluate import _mismatch, _settings, _write_poisons, budget_check, checkerboard, corner_patch, random_pattern
from problems.poison.objectives import apply_perturbation

__all__ = ["CONTRASTIVE_ROWS", "contrastive_attack", "contrastive_backdoor_report", "linear_probe"]

CONTRASTIVE_ROWS = {
    "optimized_trigger": "optimized trigger (through the contrastive victim)",
    "corner_patch": "corner patch (BadNets, 3x3)",
    "checkerboard": "checkerboard ±ε (every pixel)",
    "random_signs": "random signs ±ε (every pixel)",
}
"""The triggers of ``contrastive_backdoor_report``: result key prefix -> table label."""


class _Probe(nn.Module):
    """Encoder features, standardized with the training features' statistics, into a linear model."""

    def __init__(self, encoder: nn.Module, mean: Tensor, std: Tensor, linear: nn.Module):
        super().__init__()
        self.encoder, self.linear = encoder, linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear((encoder_features(self.encoder, x) - self.mean) / self.std)


def linear_probe(encoder: nn.Module, x: Tensor, y: Tensor, classes: int, mu: float) -> nn.Module:
    """The downstream classifier: softmax regression on standardized features, to convergence."""
    features = encoder_features(encoder, x)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    return _Probe(encoder, mean, std, fit_linear((features - mean) / std, y, classes, mu))


def contrastive_attack(settings: PoisonData, trigger: Tensor, *, models: int = 2, steps: int = 800, mu: float = 1e-2,
                       poisoned: bool = True, split: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Clean accuracy and attack success of the linear probes of ``models`` SimCLR victims trained
    (``steps`` steps, seeds 0, 1, ...) on the training images with ``trigger`` on the poisoned
    ones (``poisoned=False``: on the clean images), as mean and std over the victims ({} when
    ``models`` is 0: nothing trained)."""
    split = split or settings.split()
    training, test = training_set(settings, split), split["test"]
    x, clean_y, eps = training["x"], split["train"]["y"], training["epsilon"]
    images = apply_perturbation(x, trigger, eps) if poisoned else x
    classes = class_count(clean_y, test["y"])
    others = test["y"] != settings.target
    triggered = apply_perturbation(test["x"][others], trigger, torch.full((int(others.sum()),), settings.budget.epsilon))
    target = torch.full((triggered.shape[0],), settings.target)
    scores: dict[str, list[float]] = {"accuracy": [], "attack_success": []}
    if models == 0:
        return {}
    for index in range(models):
        encoder = seeded(3000 + index, contrastive_encoder, tuple(x.shape[1:]))
        train_contrastive(encoder, images, steps=steps, seed=index)
        probe = linear_probe(encoder, x, clean_y, classes, mu)
        scores["accuracy"].append(accuracy(probe, test["x"], test["y"]))
        scores["attack_success"].append(accuracy(probe, triggered, target))
    return {key: mean_std(values) for key, values in scores.items()}


def contrastive_backdoor_report(upper: Any, lower: Any, out_dir: Path | None = None, data: PoisonData | None = None,
                                mu: float = 1e-2, models: int = 2, steps: int = 800, patch_size: int = 3,
                                noise_seed: int = 0) -> dict[str, Any]:
    """Clean probe accuracy and attack success of fresh SimCLR victims for the optimized trigger
    and the fixed triggers of :data:`CONTRASTIVE_ROWS`, and of the optimized trigger against
    victims trained on clean images; the budget spent; the poisoned images and the triggers."""
    settings = _settings(data, "contrastive_backdoor")
    budget = settings.budget
    split = settings.split()
    training = training_set(settings, split)
    x, y, eps = training["x"], training["y"], training["epsilon"]
    optimized = upper["trigger"].detach().cpu().float()
    if list(optimized.shape) != [1, *x.shape[1:]]:
        raise _mismatch("trigger", optimized, [1, *x.shape[1:]])
    gen = torch.Generator().manual_seed(noise_seed + 41)
    shape = tuple(x.shape[1:])
    triggers = {
        "optimized_trigger": optimized.clamp(-1, 1),
        "corner_patch": corner_patch(shape, patch_size),
        "checkerboard": checkerboard(shape),
        "random_signs": random_pattern((1, *shape), "signs", gen),
    }
    rows, results = [], {}
    for key, z in triggers.items():
        scores = contrastive_attack(settings, z, models=models, steps=steps, mu=mu, split=split)
        results[key] = scores
        rows.append({"trigger": CONTRASTIVE_ROWS[key], f"clean probe accuracy ({models} victims)": scores.get("accuracy", ""),
                     f"attack success ({models} victims)": scores.get("attack_success", "")})
    clean = contrastive_attack(settings, triggers["optimized_trigger"], models=models, steps=steps, mu=mu, poisoned=False, split=split)
    rows.append({"trigger": "none (clean training; optimized trigger at test time)",
                 f"clean probe accuracy ({models} victims)": clean.get("accuracy", ""),
                 f"attack success ({models} victims)": clean.get("attack_success", "")})
    poisoned_x = apply_perturbation(x, triggers["optimized_trigger"], eps)
    check = budget_check(x, split["train"]["y"], poisoned_x, y, budget)
    out = {**check, "target": settings.target, **{f"{k}_{m}": v for k, s in results.items() for m, v in s.items()},
           **{f"no_poisoning_{m}": v for m, v in clean.items()}}
    if out_dir is not None:
        out_dir = Path(out_dir)
        _write_poisons(out_dir / "trigger.npz", settings, training, poisoned_x, y,
                       trigger=(budget.epsilon * triggers["optimized_trigger"]).numpy(), target=settings.target)
        save_image_grid(torch.cat([budget.epsilon * z for z in triggers.values()]), out_dir / "trigger.png", rows=1,
                        signed=max(budget.epsilon, 1e-8),
                        title="triggers: optimized, corner patch, checkerboard, random signs (red +, blue -)")
        shown = torch.nonzero(training["poisoned"]).flatten()[:8]
        save_image_grid(torch.cat([x[shown], poisoned_x[shown]]), out_dir / "poisons.png", rows=2, row_labels=["clean", "poisoned"],
                        title=f"poisoned images of class {settings.target} (epsilon {budget.epsilon:g})")
        write_table(rows, out_dir, "attack", title=f"Contrastive backdoor to class {settings.target}: {check['poisoned_examples']}"
                    f" of {x.shape[0]} training images carry the trigger, epsilon {budget.epsilon:g}; SimCLR victims, linear"
                    f" probes; data seed {settings.seed}")
    return out
