"""One epoch of training as the workers measure it and the driver, MLflow and history.json
record it. Checkpoints and history.json hold the plain form (`as_json`): tensors and plain
containers only, so a checkpoint loads with `weights_only=True`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EpochStats:
    """One pass over the training shards: per-exit mean loss and effective-sample fraction
    (averaged over workers), the last lr and the throughput."""

    train_loss: list[float]
    effective_samples: list[float]
    lr: float
    images_per_second: float
    compile_seconds: float | None = None  # the epoch whose first step compiled
    skipped_images: int | None = None  # folder datasets: unreadable files left out


@dataclass
class EpochRecord:
    """A finished epoch: its training stats, held-out top-1 per exit (empty without a
    held-out split), wall time and the Ray node of every rank."""

    epoch: int  # 1-based
    stats: EpochStats
    val_top1: list[float]
    epoch_seconds: float
    nodes: list[str]

    @property
    def val_mean_top1(self) -> float | None:
        return sum(self.val_top1) / len(self.val_top1) if self.val_top1 else None

    def as_json(self) -> dict[str, Any]:
        """history.json's row: optional figures only where they exist."""
        stats = self.stats
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "train_loss": stats.train_loss,
            "effective_samples": stats.effective_samples,
            "lr": stats.lr,
            "images_per_second": stats.images_per_second,
        }
        if stats.compile_seconds is not None:
            row["compile_seconds"] = stats.compile_seconds
        if stats.skipped_images is not None:
            row["skipped_images"] = stats.skipped_images
        row["val_top1"] = self.val_top1
        if self.val_mean_top1 is not None:
            row["val_mean_top1"] = self.val_mean_top1
        row["epoch_seconds"] = self.epoch_seconds
        row["nodes"] = self.nodes
        return row

    def metrics(self) -> dict[str, float]:
        """The scalar figures, as Ray Train's report takes them."""
        return {k: v for k, v in self.as_json().items() if not isinstance(v, list)}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> EpochRecord:
        """The record `as_json` wrote (a checkpoint's history after a resume)."""
        stats = EpochStats(
            row["train_loss"],
            row["effective_samples"],
            row["lr"],
            row["images_per_second"],
            row.get("compile_seconds"),
            row.get("skipped_images"),
        )
        return cls(row["epoch"], stats, row["val_top1"], row["epoch_seconds"], row["nodes"])
