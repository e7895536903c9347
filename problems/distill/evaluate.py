"""Evaluation as the distillation literature does it, as report functions of the presets.

``report``: train fresh, randomly initialized models only on the synthetic set and report their
mean +- std test accuracy over ``models`` initializations, against the same models trained on
random class-balanced real subsets of the same size (one subset per model), and with
``full_pool`` on the whole real training pool (the reference the distilled set tries to match);
also the accuracy of the problem's own lower solution (the trained student, or the kernel
regressor on the synthetic set). ``transfer_report`` (KRR-ST): pretrain fresh encoders on
(synthetic images, target representations) by regression, then fit a linear probe on a few
labeled real images per class on their frozen features, against pretraining on random real
subsets with the teacher's targets and against no pretraining.

Both write into the run directory: ``synthetic.png`` (the synthetic images, one row per class)
and ``accuracy.md`` / ``accuracy.json`` (the table)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from problems.common.data import class_count
from problems.common.images import class_balanced_subset, one_hot
from problems.common.models import make_model, seeded
from problems.common.outputs import mean_std, save_image_grid, write_table
from problems.common.training import accuracy, fit_linear, train_model
from problems.distill.data import real_split
from problems.distill.krr import krr_predict, synthetic_regression_targets
from problems.distill.objectives import student_logits, synthetic_targets

__all__ = ["evaluate_set", "report", "transfer_report"]


def _split_kwargs(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The arguments of ``real_split`` among the data source's kwargs (other keys ignored)."""
    return {k: v for k, v in (data or {}).items() if k in ("dataset", "n_train", "seed", "path")}


def evaluate_set(
    x: Tensor,
    targets: Tensor,
    test: Mapping[str, Tensor],
    classes: int,
    seed: int,
    model: str = "mlp",
    loss: Literal["ce", "mse"] = "ce",
    steps: int = 300,
    lr: float = 0.01,
    model_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """Test accuracy of one fresh model (initialized from ``seed``) trained only on (x, targets)."""
    net = seeded(seed, make_model, model, x.shape[1:], classes, **dict(model_kwargs or {})).to(x.device, x.dtype)
    train_model(net, x, targets, loss=loss, steps=steps, lr=lr, seed=seed)
    return accuracy(net, test["x"].to(x.device, x.dtype), test["y"].to(x.device))


def _grid(images: Tensor, classes: int, out_dir: Path, name: str, title: str) -> None:
    per_class = images.shape[0] // classes if images.shape[0] % classes == 0 else None
    if per_class is None:
        save_image_grid(images, out_dir / name, title=title)
        return
    names = [str(c) for c in range(classes)]
    if per_class == 1:
        save_image_grid(images, out_dir / name, rows=1, col_labels=names, title=title)
        return
    shown = images.reshape(classes, per_class, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:])
    save_image_grid(shown, out_dir / name, rows=classes, row_labels=names, title=title)


def report(
    upper: Any,
    lower: Any,
    out_dir: Path | None = None,
    data: Mapping[str, Any] | None = None,
    method: Literal["student", "krr"] = "student",
    models: int = 5,
    eval_model: Literal["linear", "mlp", "convnet"] = "mlp",
    eval_loss: Literal["ce", "mse"] = "ce",
    eval_steps: int = 300,
    eval_lr: float = 0.01,
    eval_model_kwargs: Mapping[str, Any] | None = None,
    kernel_name: Literal["nngp", "rbf"] = "nngp",
    gamma: float = 1.0,
    full_pool: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``models`` fresh models trained on the synthetic set vs on random real subsets
    of the same size (and with ``full_pool`` on the whole real pool, the same initializations and
    loss: a figure that depends on the evaluation arguments only, not on the synthetic set, so a
    comparison asks for it once per evaluation); the lower solution's own test accuracy; PNG grid
    and table in out_dir."""
    split = real_split(**_split_kwargs(data))
    pool, test = split["train"], split["test"]
    images = upper["images"].detach()
    classes = class_count(pool["y"], test["y"])
    n = images.shape[0]
    per_class = n // classes
    if per_class * classes != n:
        raise ValueError(f"{n} synthetic images do not split into {classes} classes")
    x_test = test["x"].to(images.device, images.dtype)
    if method == "krr":
        targets = synthetic_regression_targets(upper, classes).detach()
        outputs = krr_predict(images, lower["alpha"], x_test, kernel_name, gamma)
    else:
        targets = synthetic_targets(upper, classes).detach()
        outputs = student_logits(lower, x_test)
    own = float((outputs.argmax(1).cpu() == test["y"]).double().mean())
    if eval_loss == "mse" and not targets.is_floating_point():
        targets = one_hot(targets, classes).to(images)
    settings = {"model": eval_model, "loss": eval_loss, "steps": eval_steps, "lr": eval_lr, "model_kwargs": eval_model_kwargs}
    distilled, random_real, whole = [], [], []
    whole_pool = None
    if full_pool:
        whole_pool = (pool["x"].to(images.device, images.dtype),
                      one_hot(pool["y"], classes).to(images) if eval_loss == "mse" else pool["y"].to(images.device))
    for index in range(models):
        seed = 1000 + index
        distilled.append(evaluate_set(images, targets, test, classes, seed, **settings))
        subset = class_balanced_subset(pool["y"], per_class, classes, seed=index)
        real_x = pool["x"][subset].to(images.device, images.dtype)
        real_t = pool["y"][subset].to(images.device)
        if eval_loss == "mse":
            real_t = one_hot(real_t, classes).to(images)
        random_real.append(evaluate_set(real_x, real_t, test, classes, seed, **settings))
        if whole_pool is not None:
            whole.append(evaluate_set(*whole_pool, test, classes, seed, **settings))
    out = {
        "images_per_class": per_class,
        "lower_solution_test_accuracy": own,
        "distilled_accuracy": mean_std(distilled),
        "random_subset_accuracy": mean_std(random_real),
        "distilled_accuracies": distilled,
        "random_subset_accuracies": random_real,
        "eval_model": eval_model,
        "models": models,
    }
    if full_pool:
        out["full_pool_accuracy"] = mean_std(whole)
    if out_dir is not None:
        out_dir = Path(out_dir)
        _grid(images, classes, out_dir, "synthetic.png", f"distilled set, {per_class} per class")
        label = f"{eval_model} from random init, {eval_steps} Adam steps, {models} models"
        lower_name = "kernel regressor on the synthetic set" if method == "krr" else "the trained student (lower solution)"
        write_table(
            [
                {"training set": f"distilled ({n} images)", "evaluation": label, "test accuracy": out["distilled_accuracy"]},
                {"training set": f"random real subset ({n} images)", "evaluation": label, "test accuracy": out["random_subset_accuracy"]},
                *([{"training set": f"whole real pool ({pool['x'].shape[0]} images)", "evaluation": label,
                    "test accuracy": out["full_pool_accuracy"]}] if full_pool else []),
                {"training set": f"distilled ({n} images)", "evaluation": lower_name, "test accuracy": own},
            ],
            out_dir,
            "accuracy",
            title=f"Distillation, {per_class} image(s) per class (data seed {(data or {}).get('seed', 0)};"
                  f" evaluation seeds 1000-{999 + models})",
        )
    return out


def _probe_accuracy(encoder: torch.nn.Module, pool: Mapping[str, Tensor], test: Mapping[str, Tensor], classes: int,
                    probe_per_class: int, seed: int, mu: float) -> float:
    """Linear probe (L-BFGS, L2 mu) on standardized frozen features of a few labeled images per class."""
    labeled = class_balanced_subset(pool["y"], probe_per_class, classes, seed=seed)
    with torch.no_grad():
        features = encoder(pool["x"][labeled])
        mean, std = features.mean(0), features.std(0) + 1e-6
        test_features = (encoder(test["x"]) - mean) / std
    probe = fit_linear((features - mean) / std, pool["y"][labeled], classes, mu)
    return accuracy(probe, test_features, test["y"])


def transfer_report(
    upper: Any,
    lower: Any,
    out_dir: Path | None = None,
    data: Mapping[str, Any] | None = None,
    models: int = 5,
    probe_per_class: int = 5,
    probe_mu: float = 1e-2,
    pretrain_steps: int = 500,
    pretrain_lr: float = 3e-3,
) -> dict[str, Any]:
    """KRR-ST's evaluation: pretrain fresh encoders on the synthetic (images, targets) by
    regression, then linear probes with ``probe_per_class`` labels per class; against random real
    subsets of the same size with the teacher's targets, no pretraining, and the teacher."""
    from problems.distill.ssl import encoder, representations, teacher

    kwargs = _split_kwargs(data)
    split = real_split(**kwargs)
    pool, test = split["train"], split["test"]
    if "ssl_steps" in (data or {}):
        kwargs["steps"] = data["ssl_steps"]  # type: ignore[index]
    images = upper["images"].detach().cpu().float()
    targets = upper["targets"].detach().cpu().float()
    classes = class_count(pool["y"], test["y"])
    n = images.shape[0]
    per_class = n // classes
    rows: dict[str, list[float]] = {"distilled": [], "random real subset": [], "no pretraining": []}
    for index in range(models):
        seed = 1000 + index
        subset = class_balanced_subset(pool["y"], per_class, classes, seed=index)
        real_x = pool["x"][subset]
        real_t = representations(real_x, **kwargs)
        for name, (x, t) in {"distilled": (images, targets), "random real subset": (real_x, real_t), "no pretraining": (None, None)}.items():
            net = seeded(seed, encoder, images[0].numel(), out=targets.shape[1])
            if x is not None:
                train_model(net, x, t, loss="mse", steps=pretrain_steps, lr=pretrain_lr, weight_decay=0.0, seed=seed)
            rows[name].append(_probe_accuracy(net, pool, test, classes, probe_per_class, index, probe_mu))
    net, _, _ = teacher(**kwargs)
    teacher_accuracy = mean_std([_probe_accuracy(net, pool, test, classes, probe_per_class, i, probe_mu) for i in range(models)])
    out = {
        "images_per_class": per_class,
        "probe_labels_per_class": probe_per_class,
        **{f"{name.replace(' ', '_')}_probe_accuracy": mean_std(values) for name, values in rows.items()},
        "teacher_probe_accuracy": teacher_accuracy,
        "models": models,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        _grid(images, classes, out_dir, "synthetic.png", f"KRR-ST distilled set, {per_class} per class")
        table = [{"pretraining set": f"{name} ({n} images)" if name != "no pretraining" else name,
                  "linear probe test accuracy": mean_std(values)} for name, values in rows.items()]
        table.append({"pretraining set": "the self-supervised teacher (full pool)", "linear probe test accuracy": teacher_accuracy})
        write_table(table, out_dir, "accuracy", title=f"KRR-ST transfer, {per_class} image(s) per class,"
                    f" probe with {probe_per_class} labels per class (data seed {(data or {}).get('seed', 0)})")
    return out
