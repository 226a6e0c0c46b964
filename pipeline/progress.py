"""Rank 0's progress lines on the console while it trains."""

from __future__ import annotations

import time

import torch
from rich.console import Console

from pipeline.epochs import EpochRecord


class Progress:
    """Rank 0's progress lines: epoch, per-exit loss, images/s, ETA (at most every 10 s)."""

    def __init__(self, epochs: int, start_epoch: int) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.epochs, self.start_epoch = epochs, start_epoch
        self.started = time.perf_counter()
        self.last_line = 0.0

    def step(self, epoch: int, done: int, total: int, losses: torch.Tensor, rate: float) -> None:
        now = time.perf_counter()
        if now - self.last_line < 10 and done < total:
            return
        self.last_line = now
        fraction = (epoch - self.start_epoch + done / total) / (self.epochs - self.start_epoch)
        eta = (now - self.started) * (1 - fraction) / max(fraction, 1e-9)
        exits = " ".join(f"{v:.3f}" for v in losses.tolist())
        self.console.print(
            f"[bold]epoch {epoch + 1}/{self.epochs}[/] {100 * done / total:5.1f}% "
            f"loss/exit [cyan]{exits}[/] {rate:7.0f} img/s ETA {eta:5.0f}s"
        )

    def compiling(self) -> None:
        self.console.print("compiling the training step (torch.compile)...")

    def compiled(self, seconds: float) -> None:
        self.console.print(f"compiled the training step in {seconds:.1f}s")

    def epoch(self, record: EpochRecord) -> None:
        accuracy = " ".join(f"{v:.2f}" for v in record.val_top1) or "- (no held-out split)"
        self.console.print(
            f"[bold green]epoch {record.epoch}[/] val top-1/exit [green]{accuracy}[/] "
            f"({record.epoch_seconds:.1f}s)"
        )
