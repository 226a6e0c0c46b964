"""What a search found, as `boostpipe tune`, the tune stage and the search's MLflow summary
read it: every trial's summary, the trial with the params file's values, and the confirmation
of the best over fresh seeds (pipeline/confirmation.py)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from pipeline.stats import Interval, paired_interval, std

PARAMS_FILE = "params-file"  # the label of the params file's own values

# A sampled value (a temperature, loss weight or lr; grad_rescale), and one as a dotted params
# key takes it: several temperatures or weights become one list.
Sampled = float | bool
Override = float | bool | list[float]


@dataclass
class Candidate:
    label: str  # the search trial's id, or PARAMS_FILE
    sampled: dict[str, Sampled]
    overrides: dict[str, Override]
    search_score: float | None
    scores: dict[int, float] = field(default_factory=dict)  # seed -> objective, finished runs

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.scores.values()) if self.scores else None

    @property
    def std(self) -> float:
        return std(list(self.scores.values()))


@dataclass
class Confirmation:
    seeds: list[int]
    candidates: list[Candidate]  # by confirmed mean, best first; unscored ones last

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    @property
    def default(self) -> Candidate:
        return next(c for c in self.candidates if c.label == PARAMS_FILE)

    @property
    def challenger(self) -> Candidate:
        """The best configuration other than the params file's values."""
        return next(c for c in self.candidates if c.label != PARAMS_FILE)

    @property
    def gain(self) -> Interval | None:
        """The challenger's gain over the params file's values, paired by seed; None when fewer
        than two seeds finished for both."""
        new, default = self.challenger, self.default
        seeds = [s for s in self.seeds if s in new.scores and s in default.scores]
        return paired_interval([new.scores[s] for s in seeds], [default.scores[s] for s in seeds])

    @property
    def significant(self) -> bool:
        """The confirmed best is not the params file's values and its gain's 95 % interval lies
        above zero: worth writing into the params file."""
        gain = self.gain
        return self.best is not self.default and gain is not None and gain.low > 0

    @property
    def overrides(self) -> dict[str, Override]:
        """The confirmed best's values; none when the params file's values are the best."""
        return {} if self.best is self.default else self.best.overrides

    def figures(self, metric: str) -> dict[str, Any]:
        """What the parent run and outputs/tune/summary.json record (the gain: the challenger's
        over the params file's values). Names without dots, which DVC would read as nesting."""
        out: dict[str, Any] = {
            "confirmed_best": self.best.label,
            "challenger": self.challenger.label,
            "confirm_seeds": len(self.seeds),
        }
        for candidate in self.candidates:
            if candidate.mean is not None:
                out[f"confirmed_mean_{metric}_{candidate.label}"] = candidate.mean
                out[f"confirmed_std_{metric}_{candidate.label}"] = candidate.std
        if (gain := self.gain) is not None:
            out |= {"confirmed_gain": gain.mean, "gain_ci_low": gain.low, "gain_ci_high": gain.high}
        return out


@dataclass
class TrialSummary:
    trial_id: str
    outcome: str  # finished, stopped_early or failed
    epochs: int
    score: float | None
    sampled: dict[str, Sampled]
    overrides: dict[str, Override]
    val_top1_by_exit: list[float]


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str
    metric: str
    trials: list[TrialSummary]  # best first; failed ones last
    default: TrialSummary | None  # trial 0: the params.yaml values
    confirmation: Confirmation | None = None  # when tune.confirm.top_k > 0

    @property
    def best(self) -> TrialSummary | None:
        return self.trials[0] if self.trials and self.trials[0].score is not None else None

    @property
    def chosen(self) -> dict[str, Override]:
        """The values to adopt: the confirmed best's ({} when the params file's values are),
        or without a confirmation the best trial's."""
        if self.confirmation is not None:
            return self.confirmation.overrides
        return self.best.overrides if self.best is not None else {}

    def count(self, outcome: str) -> int:
        return sum(trial.outcome == outcome for trial in self.trials)
