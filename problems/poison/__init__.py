"""Data poisoning studies, for robustness research: measure how much a bounded change to a
fraction of a training set can hurt a model, to evaluate and build defenses.

* Availability poisoning (Munoz-Gonzalez et al. 2017, back-gradient optimization; Huang et al.
  2020, MetaPoison): perturb a fraction of the training images within an L-infinity ball so that
  the victim trained on them does worse on clean data.
* Backdoor trigger optimization (Sun et al. 2024, "Backdoor Contrastive Learning via Bi-level
  Trigger Optimization"): optimize an additive trigger through a simulation of the victim's
  training on data where the trigger is applied to a fraction of the examples; the victim is
  supervised, or an encoder trained by SimCLR without labels (the paper's contrastive victim),
  measured by a linear probe.

The budget (:class:`PoisonBudget`: fraction in [0, 1], epsilon in [0, 1], both finite) is
declared in the spec, validated at its dotted path and enforced by construction and projection.
See README.md."""

from __future__ import annotations

from problems.poison.budget import PoisonBudget
from problems.poison.contrastive import augment, contrastive_encoder, info_nce, train_contrastive
from problems.poison.contrastive_report import CONTRASTIVE_ROWS, contrastive_attack, contrastive_backdoor_report, linear_probe
from problems.poison.data import PoisonData, poisoned_index, test_data, train, val, zero_perturbation
from problems.poison.evaluate import (
    AVAILABILITY_ROWS,
    BACKDOOR_ROWS,
    availability_report,
    backdoor_report,
    budget_check,
    checkerboard,
    corner_patch,
    random_pattern,
    train_victims,
)
from problems.poison.objectives import (
    apply_perturbation,
    availability_loss,
    backdoor_loss,
    contrastive_backdoor_loss,
    contrastive_victim_loss,
    perturbation,
    victim_logits,
    victim_loss,
)

__all__ = [
    "AVAILABILITY_ROWS",
    "BACKDOOR_ROWS",
    "CONTRASTIVE_ROWS",
    "PoisonBudget",
    "PoisonData",
    "apply_perturbation",
    "augment",
    "availability_loss",
    "availability_report",
    "backdoor_loss",
    "backdoor_report",
    "budget_check",
    "checkerboard",
    "contrastive_attack",
    "contrastive_backdoor_loss",
    "contrastive_backdoor_report",
    "contrastive_encoder",
    "contrastive_victim_loss",
    "corner_patch",
    "info_nce",
    "linear_probe",
    "perturbation",
    "poisoned_index",
    "random_pattern",
    "test_data",
    "train",
    "train_contrastive",
    "train_victims",
    "val",
    "victim_logits",
    "victim_loss",
    "zero_perturbation",
]
