"""Dataset distillation: learn a small synthetic training set (images, optionally soft labels and
a learned inner learning rate) so that a model trained on it does well on the real data.

    min_{X_s}  L_real(theta*(X_s))      s.t.   theta*(X_s) = argmin_theta L_syn(theta; X_s)

Methods (see README.md for the math and the papers):

* student training differentiated implicitly (Blondel et al. 2022) or by unrolling (Wang et al.
  2018, with learned soft labels and inner learning rate): :mod:`problems.distill.objectives`;
* kernel ridge regression with a closed-form lower solution (KIP, Nguyen et al. 2021) and with
  self-supervised target representations (KRR-ST, Lee et al. 2024): :mod:`problems.distill.krr`,
  :mod:`problems.distill.ssl`.

Evaluation (:mod:`problems.distill.evaluate`) trains fresh randomly initialized models only on
the synthetic set and compares them with random real subsets of the same size."""

from __future__ import annotations

from problems.distill.data import label_logits, one_hot_targets, real_images, real_split, real_train, ssl_targets, test_split
from problems.distill.evaluate import evaluate_set, report, transfer_report
from problems.distill.krr import kernel, krr_lower, krr_predict, krr_real_loss, krr_solution
from problems.distill.objectives import real_loss, student_logits, student_loss, synthetic_targets

__all__ = [
    "evaluate_set",
    "kernel",
    "krr_lower",
    "krr_predict",
    "krr_real_loss",
    "krr_solution",
    "label_logits",
    "one_hot_targets",
    "real_images",
    "real_loss",
    "real_split",
    "real_train",
    "report",
    "ssl_targets",
    "student_logits",
    "student_loss",
    "synthetic_targets",
    "test_split",
    "transfer_report",
]
