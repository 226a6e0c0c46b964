"""Budgets in every currency, and the calibrate stage's result as one typed record.

A budget is an average cost per image in one currency: counted FLOPs (the paper's), or the
milliseconds the profile stage measured at batch 1 or at batch N. Calibration fits thresholds
for each with the same arithmetic (`calibration.thresholds_for_budget`), given that currency's
per-exit costs, and reports every point in all the currencies it knows. Evaluate and predict
read the result back as a `Calibration`, never as loose dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.calibration import ExitScores, Operating, check_budget, sweep, thresholds_for_budget
from pipeline.config import CalibrateConfig, ConfigError
from pipeline.profiling import PARAM_KEYS, REGIMES, ExitProfile

FLOPS = "flops"
CURRENCIES = (FLOPS, *REGIMES)
UNITS = {FLOPS: "FLOPs", **dict.fromkeys(REGIMES, "ms")}


@dataclass(frozen=True)
class Point:
    """One set of thresholds and what it did on the held-out split, in every currency."""

    p: float
    thresholds: list[float]
    top1: float
    exit_fractions: list[float]
    expected_flops: float
    expected_ms: dict[str, float] = field(default_factory=dict)  # regime -> ms per image
    budget: float | None = None  # the target it was fitted for (in `currency`); None: p grid
    currency: str = FLOPS
    stated: float | str | None = None  # a time budget as params states it: ms, or "N%"

    def expected(self, currency: str) -> float:
        return self.expected_flops if currency == FLOPS else self.expected_ms[currency]


@dataclass(frozen=True)
class Calibration:
    """What calibrate found on the held-out split (outputs/calibrate/thresholds.json)."""

    calibrated: bool
    exit_flops: list[int]
    exit_ms: dict[str, list[float]]  # regime -> per-exit ms per image ({} without a profile)
    grid: list[Point]  # the 39-point p grid
    budgets: list[Point]  # calibrate.budgets (FLOPs), in params order
    time_budgets: list[Point]  # calibrate.budgets_ms, batch-1 then batch-N
    reason: str | None = None  # why nothing was calibrated

    def costs(self, currency: str) -> list[float]:
        return list(self.exit_flops) if currency == FLOPS else self.exit_ms[currency]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        def points(key: str) -> list[Point]:
            return [Point(**row) for row in data.get(key, [])]

        return cls(
            data["calibrated"],
            data["exit_flops"],
            data.get("exit_ms", {}),
            points("grid"),
            points("budgets"),
            points("time_budgets"),
            data.get("reason"),
        )

    def thresholds_for(self, budget: float, currency: str, key: str) -> list[float]:
        """The calibrated thresholds for `budget` (in `currency`): of the target budgets' and
        the p grid's, and "all at exit 1" and "all at the last exit", those with the highest
        held-out cost within it (ties: better held-out top-1). A budget outside the exits'
        costs is refused in one line naming `key`."""
        costs = self.costs(currency)
        check_budget(budget, costs, key, UNITS[currency], above_last=currency == FLOPS)
        n, inf = len(costs), float("inf")
        ends = [([-inf] * n, costs[0]), ([inf] * (n - 1) + [-inf], costs[-1])]
        candidates = [(list(t), cost, -inf) for t, cost in ends] + [
            (point.thresholds, point.expected(currency), point.top1)
            for point in (*self.budgets, *self.time_budgets, *self.grid)
        ]
        within = [c for c in candidates if c[1] <= budget]
        return list(max(within, key=lambda c: (c[1], c[2]))[0])


def uncalibrated(reason: str, exit_flops: list[int], profile: ExitProfile | None) -> Calibration:
    exit_ms = profile.ms if profile else {}
    return Calibration(False, exit_flops, exit_ms, [], [], [], reason)


def _point(
    p: float,
    operating: Operating,
    exit_flops: Sequence[int],
    profile: ExitProfile | None,
    budget: float | None = None,
    currency: str = FLOPS,
    stated: float | str | None = None,
) -> Point:
    ms = {r: operating.cost_in(profile.ms[r]) for r in REGIMES} if profile else {}
    return Point(
        p,
        operating.thresholds,
        operating.top1,
        operating.exit_fractions,
        operating.cost_in(exit_flops),
        ms,
        budget,
        currency,
        stated,
    )


def in_ms(stated: float | str, costs: Sequence[float]) -> float:
    """A time budget in ms: as stated, or its share ("60%") of the last exit's cost."""
    return float(stated[:-1]) / 100 * costs[-1] if isinstance(stated, str) else stated


@dataclass(frozen=True)
class ResolvedTimeBudget:
    """One of calibrate.budgets_ms, read against the profile: `stated` in params, `ms` meant."""

    regime: str
    stated: float | str  # ms, or "N%" of the last exit's measured cost
    ms: float
    key: str  # the params key, for messages


def time_budgets(config: CalibrateConfig, profile: ExitProfile | None) -> list[ResolvedTimeBudget]:
    """Every time budget in params, batch-1 first, in ms per image; refused in one line naming
    its key, before any work, without a profile or outside the exits' measured costs."""
    found = []
    for regime in REGIMES:
        key = f"calibrate.budgets_ms.{PARAM_KEYS[regime]}"
        for stated in getattr(config.budgets_ms, PARAM_KEYS[regime]):
            if profile is None:
                raise ConfigError(f"{key}: time budgets need the profile stage's exit costs")
            costs = profile.ms[regime]
            ms = in_ms(stated, costs)
            share = isinstance(stated, str)
            named = f"{key}: {stated} of the last exit's {costs[-1]:.4g} ms" if share else key
            check_budget(ms, costs, named, "ms", above_last=False)
            found.append(ResolvedTimeBudget(regime, stated, ms, key))
    return found


def calibrate(
    scores: ExitScores,
    exit_flops: list[int],
    profile: ExitProfile | None,
    config: CalibrateConfig,
) -> Calibration:
    """Thresholds for every p of the grid and for every budget in params, each reported in
    FLOPs and (with a profile) in ms at batch 1 and batch N."""
    grid = [_point(p, op, exit_flops, profile) for p, op in sweep(scores, exit_flops)]
    flops_points = [
        _point(*thresholds_for_budget(scores, exit_flops, b), exit_flops, profile, b)
        for b in config.budgets
    ]
    timed = []
    for budget in time_budgets(config, profile):
        assert profile is not None  # time_budgets refuses time budgets without one
        costs = profile.ms[budget.regime]
        found = thresholds_for_budget(scores, costs, budget.ms, key=budget.key, unit="ms")
        timed.append(_point(*found, exit_flops, profile, budget.ms, budget.regime, budget.stated))
    exit_ms = profile.ms if profile else {}
    return Calibration(True, exit_flops, exit_ms, grid, flops_points, timed)
