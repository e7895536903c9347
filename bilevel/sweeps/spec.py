"""The sweep file: a ``sweep:`` section declaring the search space and the study.

    sweep:
      spec: ../problems/hpo/l2_scalar.yaml     # the bilevel spec (file, relative to this one, or preset)
      study: l2-scalar                         # the study's name in the storage
      storage: sqlite:///runs/sweeps/l2.db     # where the study lives (resumable)
      trials: 20                               # trials to add per invocation
      objective: final_upper_loss              # or report.<key> from result.json
      direction: minimize
      space:
        engine: {choices: [implicit, unrolled]}
        outer_lr: {low: 0.01, high: 1.0, log: true}
        inner_steps: {low: 10, high: 200, log: true}
        mu: {path: levels.lower.objective_kwargs.mu, low: 1e-4, high: 1e-1, log: true}
      pruner: {kind: median, n_startup_trials: 5, n_warmup_steps: 10}

A parameter's kind is ``float`` / ``int`` / ``categorical`` (inferred when omitted: choices ->
categorical, integer bounds -> int, else float)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from bilevel.spec._base import SpecModel

__all__ = ["CategoricalParam", "FloatParam", "IntParam", "Param", "PARAM_KINDS", "PrunerSpec", "SamplerSpec", "SweepSpec"]

PARAM_KINDS = frozenset({"float", "int", "categorical"})


class FloatParam(SpecModel):
    """A real number in [low, high]."""

    kind: Literal["float"] = "float"
    """Discriminator (inferred from non-integer bounds)."""
    low: float
    """Smallest value."""
    high: float
    """Largest value."""
    log: bool = False
    """Sample log-uniformly (low must be > 0): for learning rates and regularization strengths."""
    path: str | None = None
    """Dotted path of the spec field it sets (named parameters know theirs: outer_lr, inner_lr)."""

    @model_validator(mode="after")
    def _bounds(self) -> "FloatParam":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        return self


class IntParam(SpecModel):
    """An integer in [low, high]."""

    kind: Literal["int"] = "int"
    """Discriminator (inferred from integer bounds)."""
    low: int
    """Smallest value."""
    high: int
    """Largest value."""
    log: bool = False
    """Sample log-uniformly (low must be >= 1; step must be 1)."""
    step: Annotated[int, Field(ge=1)] = 1
    """Spacing of the values."""
    path: str | None = None
    """Dotted path of the spec field it sets (named parameters know theirs: inner_steps)."""

    @model_validator(mode="after")
    def _bounds(self) -> "IntParam":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log: true needs low >= 1 and step 1")
        return self


class CategoricalParam(SpecModel):
    """One of a list of values."""

    kind: Literal["categorical"] = "categorical"
    """Discriminator (inferred from ``choices``)."""
    choices: Annotated[list[Union[bool, int, float, str]], Field(min_length=1)]
    """The values to choose from (engine kinds for ``engine``)."""
    path: str | None = None
    """Dotted path of the spec field it sets (``engine`` knows its own)."""


def _param_kind(value: Any) -> str | None:
    if not isinstance(value, dict):
        return getattr(value, "kind", None)
    if "kind" in value:
        return value["kind"]
    if "choices" in value:
        return "categorical"
    low, high = value.get("low"), value.get("high")
    integral = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
    return "int" if integral else "float"


Param = Annotated[
    Union[Annotated[FloatParam, Tag("float")], Annotated[IntParam, Tag("int")], Annotated[CategoricalParam, Tag("categorical")]],
    Discriminator(_param_kind),
]


class PrunerSpec(SpecModel):
    """Stops unpromising trials early on the upper loss each run reports at its logged steps."""

    kind: Literal["median", "percentile", "hyperband", "threshold", "none"] = "median"
    """median / percentile: prune a trial whose upper loss is worse than the median (percentile) of
    the earlier trials at the same step; hyperband: successive halving over the outer steps;
    threshold: prune once the upper loss exceeds ``upper``; none: no pruning."""
    n_startup_trials: Annotated[int, Field(ge=0)] = 5
    """median / percentile: trials that run to the end before any is pruned."""
    n_warmup_steps: Annotated[int, Field(ge=0)] = 10
    """median / percentile / threshold: outer steps of each trial before it may be pruned."""
    percentile: Annotated[float, Field(ge=0, le=100)] = 25.0
    """percentile: the percentile of the earlier trials' losses a trial must stay within."""
    upper: float | None = None
    """threshold: the upper loss above which a trial is pruned."""

    @model_validator(mode="after")
    def _threshold(self) -> "PrunerSpec":
        if self.kind == "threshold" and self.upper is None:
            raise ValueError("a threshold pruner needs upper: the loss above which a trial is pruned")
        return self


class SamplerSpec(SpecModel):
    """How Optuna proposes the next trial."""

    kind: Literal["tpe", "random"] = "tpe"
    """tpe: tree-structured Parzen estimator (Bergstra et al. 2011); random: uniform sampling."""
    seed: int | None = 0
    """Seed; a resumed study seeds with seed + the number of trials it holds, so it does not repeat
    the first run's proposals."""


class SweepSpec(SpecModel):
    """A hyperparameter sweep over what a bilevel run cannot differentiate (the engine, the outer
    learning rate, the inner steps, any spec field), with Optuna."""

    spec: str | None = None
    """The bilevel spec to sweep over: a file (relative to the sweep file) or a preset name; may be
    given on the command line instead."""
    study: str = "bilevel-sweep"
    """The study's name in the storage: the same name resumes it."""
    storage: str | None = None
    """Optuna storage URL, e.g. sqlite:///runs/sweeps/study.db (relative to the working directory);
    None: sqlite:///<out>/study.db."""
    out: str | None = None
    """Directory of the trials' run directories (trial-0000, ...); None: runs/sweeps/<study>."""
    trials: Annotated[int, Field(ge=1)] = 20
    """Trials to run in this invocation (added to those the study already holds)."""
    objective: str = "final_upper_loss"
    """What a trial's value is: a number in result.json (final_upper_loss, wall_time_s) or
    report.<key> (a value of the problem's report function, e.g. report.test_accuracy)."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether the objective is minimized or maximized."""
    space: dict[str, Param] = Field(default_factory=dict)
    """Parameter name -> its range. Named parameters: engine (categorical over engine kinds),
    outer_lr, inner_lr, inner_steps; any other name needs a path. Empty: the default space
    (outer_lr and inner_steps around the spec's values, engine over the compatible engines)."""
    set: list[str] = Field(default_factory=list)
    """Fixed overrides applied to every trial (dotted.path=value, as `bilevel run --set`)."""
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    """Early stopping of unpromising trials."""
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    """How trials are proposed."""
