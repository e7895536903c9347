"""A spec's declared hyperparameters as a search space for a black-box search of your own
(Optuna, random search), outside ``bilevel sweep``:

    import optuna
    from bilevel.presets import find_preset
    from bilevel.spec import load_spec
    from bilevel.sweeps import hyperparameter_space, suggest_hyperparameters

    space = hyperparameter_space(load_spec(find_preset("hpo/mlp_stn")))
    study = optuna.create_study()
    study.optimize(lambda trial: my_training(**suggest_hyperparameters(trial, space)), n_trials=30)

The ranges are the declarations' own: uniform in [low, high], log-uniform with ``log: true``,
integers for ``type: integer``, one of ``choices`` for ``type: categorical``."""

from __future__ import annotations

import math
import random
from typing import Any

from bilevel.spec import HyperparameterVariable

__all__ = ["draw_hyperparameters", "hyperparameter_space", "suggest_hyperparameters"]


def hyperparameter_space(loaded: Any) -> dict[str, HyperparameterVariable]:
    """The top level's hyperparameter variables (``kind: hyperparameter``) of a LoadedSpec (or a
    BilevelSpec), by name: what a search samples."""
    spec = getattr(loaded, "spec", loaded)
    upper = next(level for level in spec.levels.values() if level.parent is None)
    return {name: var for name, var in upper.variables.items() if isinstance(var, HyperparameterVariable)}


def suggest_hyperparameters(trial: Any, space: dict[str, HyperparameterVariable]) -> dict[str, Any]:
    """One point of the declared ranges, proposed by an Optuna trial (suggest_float with
    log=..., suggest_int, suggest_categorical under each variable's name)."""
    point: dict[str, Any] = {}
    for name, var in space.items():
        if var.type == "categorical":
            point[name] = trial.suggest_categorical(name, var.choices)
        elif var.type == "integer":
            point[name] = trial.suggest_int(name, int(var.low), int(var.high), log=var.log)
        else:
            point[name] = trial.suggest_float(name, var.low, var.high, log=var.log)
    return point


def draw_hyperparameters(space: dict[str, HyperparameterVariable], rng: random.Random) -> dict[str, Any]:
    """One point of the declared ranges drawn at random: uniform (log-uniform with log: true),
    integers, choices."""
    point: dict[str, Any] = {}
    for name, var in space.items():
        if var.type == "categorical":
            point[name] = rng.choice(var.choices)
        elif var.type == "integer":
            point[name] = rng.randint(int(var.low), int(var.high))
        elif var.log:
            point[name] = math.exp(rng.uniform(math.log(var.low), math.log(var.high)))
        else:
            point[name] = rng.uniform(var.low, var.high)
    return point
