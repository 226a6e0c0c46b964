"""The `tune` section: what `boostpipe tune` searches, how, and how it confirms the winner."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config.base import (
    Count,
    KeyProblem,
    NonNegative,
    NonNegativeInt,
    Positive,
    Section,
)


class SearchRange(Section):
    """A range [low, high] to sample from; `log` samples log-uniformly."""

    low: NonNegative
    """Lower end."""
    high: NonNegative
    """Upper end (above low)."""
    log: bool = False
    """Sample log-uniformly (low above 0)."""

    @model_validator(mode="after")
    def _check_order(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low == 0:
            raise ValueError("a log range must start above 0")
        return self


class TemperatureRange(SearchRange):
    per: Literal["shared", "pair", "exit"] = "shared"
    """shared: one t for every exit; pair: [first, last], spaced linearly; exit: one per exit."""


class SearchSpace(Section):
    """What `boostpipe tune` samples; null leaves the params.yaml value in place."""

    temperature: TemperatureRange | None = TemperatureRange(low=0.0, high=1.0)
    """Range of boost.temperature; null keeps the params file's value."""
    loss_weights: SearchRange | None = SearchRange(low=0.5, high=2.0, log=True)
    """Range of boost.loss_weights, one weight sampled per exit; null keeps the file's value."""
    lr: SearchRange | None = None
    """Range of train.lr; null keeps the params file's value."""
    grad_rescale: bool = False
    """true: also try gradient rescaling on and off."""


class ConfirmConfig(Section):
    """After the search, the best `top_k` configurations and the params file's values are
    retrained with `seeds` fresh seeds each (the trials' budget), so the winner is judged on a
    mean over seeds, not on one lucky draw. top_k 0: no confirmation."""

    top_k: NonNegativeInt = 2
    """How many of the best trials are retrained; 0: no confirmation."""
    seeds: Annotated[int, Field(strict=True, ge=2)] = 3
    """Fresh seeds per configuration; two at least, for a paired interval."""


TUNE_METRICS = ("val_budget_auc", "val_mean_top1", "val_final_top1")


class TuneConfig(Section):
    """Ray Tune search over BoostNet's temperatures and loss weights (`boostpipe tune`).

    Trials train on `train_subset` images for `epochs` epochs and are scored on the held-out
    split (never the test split) after every epoch, so ASHA can stop weak ones early.
    """

    trials: Count = 64
    """Trials; the params file's own values are the first."""
    search: Literal["random", "optuna"] = "random"
    """random sampling, or optuna (TPE)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha stops weak trials early; fifo runs every trial to the end."""
    grace_period: Count = 1
    """ASHA: epochs before a trial can be stopped."""
    reduction_factor: Annotated[float, Field(strict=True, gt=1)] = 3
    """ASHA: 1/reduction_factor of the trials go on at each rung."""
    metric: Literal[TUNE_METRICS] = "val_budget_auc"
    """The objective, on the held-out split: val_budget_auc is the mean best top-1 over budgets
    from exit 1's cost to the last exit's."""
    epochs: Count = 3
    """Epochs per trial."""
    train_subset: Count | None = 2500
    """Training images per trial; null: all."""
    val_subset: Count | None = 1500
    """Held-out images a trial is scored on after each epoch; null: all."""
    max_concurrent: Count = 2
    """Trials running at once."""
    cpus_per_trial: Positive = 1
    """CPUs each trial reserves."""
    gpus_per_trial: NonNegative = 0
    """GPUs each trial reserves; fractions share a GPU between trials."""
    workers_per_trial: Count = 1
    """Above 1: every trial is a Ray Train DDP job with this many workers."""
    seed: NonNegativeInt = 0
    """The trials' seed; confirmation uses the next ones."""
    space: SearchSpace = SearchSpace()
    """What the search samples."""
    confirm: ConfirmConfig = ConfirmConfig()
    """Retraining the best over fresh seeds after the search."""

    @model_validator(mode="after")
    def _check_schedule(self) -> TuneConfig:
        if self.scheduler == "asha" and self.grace_period > self.epochs:
            raise KeyProblem(
                "tune.grace_period", f"is {self.grace_period} but trials run {self.epochs} epochs"
            )
        return self
