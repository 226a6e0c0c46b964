"""The evaluate stage's report: anytime and budgeted accuracy on the test split, and real early
exit timed against its targets.

Every budget's thresholds come from calibrate. Budgets in FLOPs are timed at batch N against
running every exit (the speedup FLOPs predict, and the one measured) and beside the time the
profile predicts; budgets in ms are timed in their own regime (batch N on the whole test split,
batch 1 on a seeded sample of it) and reported as measured ms per image beside the target.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import reports
from pipeline.boosting import BoostNet
from pipeline.budgets import Calibration, Point
from pipeline.calibration import ExitScores, Operating, flat_envelope, operate
from pipeline.devices import describe_device
from pipeline.evaluation import EarlyExitRun, Source, collect_scores, early_exit, time_all_exits
from pipeline.latency import early_exit_one_at_a_time
from pipeline.profiling import BATCH_1, BATCH_N, COLUMNS, REGIMES, ExitProfile, forced_exit


def anytime_rows(scores: ExitScores, profile: ExitProfile) -> list[dict[str, float]]:
    """Anytime prediction: every sample classified by exit k, for each k (anytime.json), at
    exit k's FLOPs and profiled ms per image."""
    top1, top5 = scores.top1(), scores.top5_accuracy()
    return [
        {
            "exit": k + 1,
            "mflops": profile.flops[k] / 1e6,
            **{COLUMNS[r]: profile.ms[r][k] for r in REGIMES},
            "top1": top1[k],
            "top5": top5[k],
        }
        for k in range(len(profile.flops))
    ]


def _on_test(scores: ExitScores, point: Point, exit_flops: list[int]) -> Operating:
    return operate(scores, torch.tensor(point.thresholds, dtype=torch.float64), exit_flops)


def budget_curve(
    scores: ExitScores, calibration: Calibration, profile: ExitProfile
) -> list[dict[str, float]]:
    """Budgeted batch classification on the test split at every calibrated p (the calibrate
    stage's thresholds and held-out top-1), in MFLOPs and in the profile's predicted ms per
    image, with the flat envelope that picks points by their held-out accuracy."""
    points = [_on_test(scores, row, profile.flops) for row in calibration.grid]
    flat = flat_envelope(
        [point.expected_cost for point in points],
        [row.top1 for row in calibration.grid],
        [point.top1 for point in points],
    )
    return [
        {
            "p": row.p,
            "mflops": point.expected_cost / 1e6,
            **{COLUMNS[r]: point.cost_in(profile.ms[r]) for r in REGIMES},
            "top1": point.top1,
            "top1_flat": level,
            "val_top1": row.top1,
        }
        for row, point, level in zip(calibration.grid, points, flat, strict=True)
    ]


@dataclass(frozen=True)
class Timed:
    """Median wall time of one early-exit configuration over interleaved repeats, and one run's
    predictions (for its accuracy)."""

    seconds: float
    run: EarlyExitRun

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / len(self.run.targets)


def interleaved(jobs: list[Callable[[], EarlyExitRun]], repeats: int, warmup: int) -> list[Timed]:
    """Every job once per round, `repeats` rounds, so drift in machine load hits all alike,
    after `warmup` untimed rounds (allocator, thread pool and kernel set-up on these shapes)."""
    for _ in range(warmup):
        for job in jobs:
            job()
    runs: list[list[EarlyExitRun]] = [[] for _ in jobs]
    for _ in range(repeats):
        for job, kept in zip(jobs, runs, strict=True):
            kept.append(job())
    return [Timed(statistics.median(r.seconds for r in kept), kept[0]) for kept in runs]


def _all_exits(net: BoostNet, source: Source, device: torch.device) -> Callable[[], EarlyExitRun]:
    def job() -> EarlyExitRun:
        seconds = time_all_exits(net, source, device)
        empty = torch.empty(0)
        return EarlyExitRun(empty, empty, torch.empty(len(source.split)), seconds)

    return job


def _top1(run: EarlyExitRun) -> float:
    return 100.0 * float((run.predictions == run.targets).double().mean())


def flops_metrics(
    scores: ExitScores, point: Point, timed: Timed, every_exit: Timed, profile: ExitProfile
) -> dict[str, float]:
    """A FLOPs budget on the test split: expected cost and top-1 of its thresholds, real early
    exit's top-1 and throughput, the speedup over running every exit measured and as FLOPs
    predict it, and the ms per image the profile predicts beside the measured ms."""
    expected = _on_test(scores, point, profile.flops)
    measured = every_exit.seconds / timed.seconds
    predicted = profile.flops[-1] / expected.expected_cost
    return {
        "target_mflops": float(point.budget or 0) / 1e6,
        "expected_mflops": expected.expected_cost / 1e6,
        "top1": expected.top1,
        "early_exit_top1": _top1(timed.run),
        "seconds": timed.seconds,
        "images_per_second": len(scores.targets) / timed.seconds,
        "speedup_measured": measured,
        "speedup_predicted": predicted,
        "speedup_ratio": measured / predicted,
        "predicted_ms": expected.cost_in(profile.ms[BATCH_N]),
        "measured_ms": timed.ms_per_image,
    }


def time_metrics(
    scores: ExitScores, point: Point, timed: Timed, profile: ExitProfile, drift: float
) -> dict[str, Any]:
    """A time budget: the target, what the profile predicts at the test split's exit fractions,
    and what early exit measured in the budget's regime (all ms per image). `drift` is how the
    machine's speed moved since the profile (the last exit's cost now over then, timed in the
    same rounds as the budget), so the target can also be read at the speed it was set for."""
    expected = _on_test(scores, point, profile.flops)
    target = float(point.budget or 0)
    return {
        "regime": point.currency,
        "target_ms": target,
        "expected_ms": expected.cost_in(profile.ms[point.currency]),
        "measured_ms": timed.ms_per_image,
        "measured_over_target": timed.ms_per_image / target,
        "drift": drift,
        "measured_over_target_at_profile_speed": timed.ms_per_image / (target * drift),
        "top1": expected.top1,
        "early_exit_top1": _top1(timed.run),
        "expected_mflops": expected.expected_cost / 1e6,
        "images_timed": len(timed.run.targets),
    }


@dataclass(frozen=True)
class Report:
    """What the evaluate stage writes and logs: anytime.json, budget_curve.json,
    time_budgets.json, metrics.json; `skipped` counts unreadable test files passed over."""

    anytime: list[dict[str, float]]
    budget_curve: list[dict[str, float]]
    time_budgets: list[dict[str, Any]]
    metrics: dict[str, Any]
    skipped: int
    uncalibrated: str | None  # why there are no budgets (data.val_size: 0), if so

    def summary(self) -> list[str]:
        """The console lines: per-exit top-1, then each budget (or why there are none)."""
        lines = []
        if self.skipped:
            lines.append(
                f"skipped {self.skipped} unreadable image(s) of the test split (data.skip_bad)"
            )
        lines.append("test top-1 per exit: " + " ".join(f"{r['top1']:.2f}" for r in self.anytime))
        if self.uncalibrated:
            lines.append(f"budgeted evaluation skipped: {self.uncalibrated}")
        for name, row in self.metrics["budgets"].items():
            lines.append(
                f"{name}: top-1 {row['top1']:.2f}%, {row['images_per_second']:.0f} img/s, "
                f"speedup {row['speedup_measured']:.2f}x measured, "
                f"{row['speedup_predicted']:.2f}x predicted; {row['measured_ms']:.4f} ms/image "
                f"measured, {row['predicted_ms']:.4f} profiled"
            )
        for name, row in self.metrics["time_budgets"].items():
            lines.append(
                f"{name}: top-1 {row['top1']:.2f}%, {row['measured_ms']:.4f} ms/image measured "
                f"against {row['target_ms']:.4g} targeted ({row['measured_over_target']:.2f}x; "
                f"{row['measured_over_target_at_profile_speed']:.2f}x at the profile's speed: "
                f"the last exit took {row['drift']:.2f}x its profiled time in this run)"
            )
        return lines


MIN_BATCHES = 3  # fewer, and a timed pass is mostly its set-up
MIN_REPEATS = 3  # a median of fewer is one noisy pass


def timing_caveats(test_images: int, batch_size: int, repeats: int) -> list[str]:
    """Why this evaluation's measured times would say little, one line each naming the key."""
    lines = []
    batches = -(-test_images // batch_size)
    if batches < MIN_BATCHES:
        lines.append(
            f"evaluate.batch_size: the {test_images} test images make {batches} batch(es) of "
            f"{batch_size}; timings of fewer than {MIN_BATCHES} are mostly set-up, so read the "
            "measured speedups with care"
        )
    if repeats < MIN_REPEATS:
        lines.append(
            f"evaluate.timing_repeats: {repeats}; a median of fewer than {MIN_REPEATS} timed "
            "passes is one noisy pass, so read the measured speedups with care"
        )
    return lines


def evaluate(
    net: BoostNet,
    test: Source,
    single: Source,
    device: torch.device,
    calibration: Calibration,
    profile: ExitProfile,
    repeats: int,
    warmup: int,
) -> Report:
    """Score every exit on the test split and apply the calibrated thresholds to those scores;
    time real early exit at every budget (`single`: the batch-1 sample), interleaved repeats."""
    scores, skipped = collect_scores(net, test, device)
    timed_points = [*calibration.budgets, *calibration.time_budgets]

    def job(thresholds: list[float], regime: str) -> Callable[[], EarlyExitRun]:
        if regime == BATCH_1:
            return lambda: early_exit_one_at_a_time(net, single, thresholds, device)
        return lambda: early_exit(net, test, thresholds, device)

    # The profile's last exit, timed again beside the budgets: how far the machine's speed has
    # drifted since the profile ran (another stage, minutes or a machine away).
    regimes = [r for r in REGIMES if any(p.currency == r for p in calibration.time_budgets)]
    last_exit = forced_exit(net.n_exits - 1, net.n_exits)
    every_exit, *timed = interleaved(
        [
            _all_exits(net, test, device),
            *(job(last_exit, regime) for regime in regimes),
            *(job(point.thresholds, point.currency) for point in timed_points),
        ],
        repeats,
        warmup,
    )
    anchors, timed = timed[: len(regimes)], timed[len(regimes) :]
    drift = {
        regime: anchor.ms_per_image / profile.ms[regime][-1]
        for regime, anchor in zip(regimes, anchors, strict=True)
    }
    flops_timed, time_timed = timed[: len(calibration.budgets)], timed[len(calibration.budgets) :]
    top1, top5 = scores.top1(), scores.top5_accuracy()
    time_rows = {
        reports.time_budget_key(point.stated or 0, point.currency): time_metrics(
            scores, point, t, profile, drift[point.currency]
        )
        for point, t in zip(calibration.time_budgets, time_timed, strict=True)
    }
    metrics = {
        "anytime": {
            "top1": {f"exit_{k + 1}": v for k, v in enumerate(top1)},
            "top5": {f"exit_{k + 1}": v for k, v in enumerate(top5)},
        },
        "final_top1": top1[-1],
        "mean_top1": sum(top1) / len(top1),
        "all_exits": {
            "seconds": every_exit.seconds,
            "images_per_second": len(scores.targets) / every_exit.seconds,
            "ms_per_image": every_exit.ms_per_image,
        },
        "device": describe_device(device),  # where the scores and the early-exit timings ran
        "threads": torch.get_num_threads(),
        "budgets": {
            reports.budget_key(point.budget or 0): flops_metrics(
                scores, point, t, every_exit, profile
            )
            for point, t in zip(calibration.budgets, flops_timed, strict=True)
        },
        "time_budgets": time_rows,
        "calibrated": calibration.calibrated,
    }
    fields = ("regime", "target_ms", "measured_ms", "early_exit_top1")
    measured = [{key: row[key] for key in fields} for row in time_rows.values()]
    return Report(
        anytime_rows(scores, profile),
        budget_curve(scores, calibration, profile),
        measured,
        metrics,
        skipped,
        calibration.reason,
    )
