"""What a run holds, laid out for MLflow's charts (names.py: one chart section per prefix):
per-epoch metrics (step = epoch), logged live from the Ray worker as each epoch ends, the
evaluation (per exit, step = exit index; the budgeted curve, step = expected cost in kFLOPs),
and files as artifacts."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.epochs import EpochRecord
from pipeline.tracking.names import (
    BUDGET_TOP1,
    BUDGET_TOP1_FLAT,
    EPOCH_SECONDS,
    EXIT_MFLOPS,
    EXIT_TOP1,
    EXIT_TOP5,
    FINAL_TOP1,
    MEAN_TOP1,
    budget_top1_by_us,
    exit_ms,
    flops_budget,
    per_exit,
    time_budget,
)
from pipeline.tracking.outbox import Record, announce_delay, caught_up
from pipeline.tracking.runs import finish_run
from pipeline.tracking.store import bound_waits, local_store


def log_metrics(run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    """(key, value, step) triples in one log_batch call (MLflow splits it into requests)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value, step in metrics]
    MlflowClient().log_batch(run_id, metrics=batch)


def log_artifacts(run_id: str, files: Iterable[Path], folder: str | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in files:
        if path.exists():
            client.log_artifact(run_id, str(path), folder)


def epoch_metrics(record: EpochRecord) -> Iterator[tuple[str, float, int]]:
    """One epoch as (key, value, step = epoch) metrics: per exit, then the scalars it has (no
    held-out mean without a held-out split, compile time once, skipped files for folders)."""
    stats, step = record.stats, record.epoch
    per_exit_values = {
        "train/loss": stats.train_loss,
        "val/top1": record.val_top1,
        "train/effective_samples": stats.effective_samples,
    }
    for quantity, values in per_exit_values.items():
        for index, value in enumerate(values, start=1):
            yield per_exit(quantity, index), value, step
    scalars = {
        "val/mean_top1": record.val_mean_top1,
        "train/lr": stats.lr,
        "train/images_per_second": stats.images_per_second,
        EPOCH_SECONDS: record.epoch_seconds,
        "train/compile_seconds": stats.compile_seconds,
        "train/skipped_images": stats.skipped_images,
    }
    yield from ((key, value, step) for key, value in scalars.items() if value is not None)


# What to do when another node cannot reach a store on this machine's disk.
REACH_TRACKING = "set tracking.uri (or MLFLOW_TRACKING_URI) to a server every node can reach"


@dataclass
class EpochLogger:
    """Logs each epoch into run `run_id` of store `uri` as it ends, from rank 0's Ray worker
    (pickled there), so the UI's charts grow while training runs. A resumed run logs only the
    epochs it trains. Epochs the store did not take are sent with the next one; the train stage
    sends any still missing after training (`log_training`)."""

    uri: str
    run_id: str
    outbox: Path  # the project's (absolute): where an outage is marked (outbox.DELAYED)
    unsent: list[EpochRecord] = field(default_factory=list)

    def __call__(self, record: EpochRecord) -> None:
        import mlflow

        if mlflow.get_tracking_uri() != self.uri:
            bound_waits("stage")
            mlflow.set_tracking_uri(self.uri)
        self.unsent.append(record)
        try:
            log_metrics(self.run_id, (m for r in self.unsent for m in epoch_metrics(r)))
        except Exception as exc:  # the store is away: these go with the next epoch
            announce_delay(
                self.uri, f"epoch {record.epoch}", exc, self.outbox, "kept by the Ray worker"
            )
            return
        if len(self.unsent) > 1:
            caught_up(f"{len(self.unsent)} epochs' metrics", self.outbox)
        self.unsent.clear()

    def must_reach(self) -> dict[str, str]:
        """A store on this machine's disk: every node that may host rank 0 must reach it."""
        store = local_store(self.uri)
        return {store: REACH_TRACKING} if store else {}


def log_evaluation(
    run_id: str,
    metrics: dict[str, Any],
    anytime: list[dict[str, Any]],
    budget_curve: list[dict[str, Any]],
    files: list[Path],
) -> None:
    """Laid out for the UI's charts: per-exit values use the exit index as the step (so runs
    overlay accuracy against exit), the budgeted curve uses the expected cost in kFLOPs and
    the profile's predicted time in microseconds per image at batch 1 and batch N (steps are
    integers). The run is FINISHED: evaluate is the last stage."""

    def values() -> Iterable[tuple[str, float, int]]:
        for row in anytime:
            yield EXIT_TOP1, row["top1"], row["exit"]
            yield EXIT_TOP5, row["top5"], row["exit"]
            yield EXIT_MFLOPS, row["mflops"], row["exit"]
            for column in ("ms_batch_1", "ms_batch_n"):
                yield exit_ms(column), row[column], row["exit"]
        for row in sorted(budget_curve, key=lambda r: r["mflops"]):
            step = round(row["mflops"] * 1000)
            yield BUDGET_TOP1, row["top1"], step
            yield BUDGET_TOP1_FLAT, row["top1_flat"], step
        for column in ("ms_batch_1", "ms_batch_n"):
            for row in sorted(budget_curve, key=lambda r: r[column]):
                step = round(row[column] * 1000)
                yield budget_top1_by_us(column[3:]), row["top1_flat"], step
        yield FINAL_TOP1, metrics["final_top1"], 0
        yield MEAN_TOP1, metrics["mean_top1"], 0
        for row in metrics["budgets"].values():
            for key in ("top1", "expected_mflops", "speedup_measured", "speedup_predicted"):
                yield flops_budget(row["target_mflops"], key), row[key], 0
        for name, row in metrics["time_budgets"].items():
            for key in ("top1", "target_ms", "measured_ms", "measured_over_target", "drift"):
                yield time_budget(name, key), row[key], 0

    log_metrics(run_id, values())
    log_artifacts(run_id, files)
    finish_run(run_id)


def send_artifacts(run_id: str, record: Record) -> None:
    log_artifacts(run_id, record.files)


def send_evaluation(run_id: str, record: Record) -> None:
    details = record.details
    log_evaluation(run_id, details["metrics"], details["anytime"], details["curve"], record.files)
