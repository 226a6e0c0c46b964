"""Scoring a trained BoostNet: every exit's scores, anytime accuracy, and real early exit.

`early_exit` runs the test set block by block: samples leave as they exit, and those that go on
are gathered into full batches for the next block, so measured wall time shows the saving that
expected FLOPs only predict. Splits are streamed in batches (folder datasets decoded by loader
processes), and only per-exit scores are kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.augment import normalise
from pipeline.boosting import BoostNet, ExitRunner
from pipeline.calibration import ExitScores
from pipeline.config import DataConfig, Params
from pipeline.data import AnySplit
from pipeline.flops import count_exit_costs
from pipeline.inputs import check_bad, default_loader_workers, eval_batches
from pipeline.io import load_checkpoint

# Inference runs channels-last: oneDNN runs MSDNet's small convolutions faster in that layout on
# CPU (in training the batch-norm backward pass loses the gain again).
CHANNELS_LAST = torch.channels_last


@dataclass(frozen=True)
class Source:
    """Where evaluation reads a split from: the split, how to decode it (folder datasets: the
    files under `root`, with `workers` loader processes) and the batch size."""

    split: AnySplit
    data: DataConfig
    batch_size: int
    root: Path | None = None
    workers: int = 0
    augment: str = "none"  # a train.augment kind: calibrate.augment scores augmented images
    seed: int = 0

    def batches(
        self, device: torch.device, skipped: list[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised channels-last inputs on `device`, targets); unreadable files stop it
        unless data.skip_bad, and are then counted into `skipped[0]`."""
        spec = self.data.spec
        for images, targets, bad in eval_batches(
            self.split, self.data, self.batch_size, self.root, self.workers, self.augment, self.seed
        ):
            count = check_bad(bad, self.data)
            if skipped is not None:
                skipped[0] += count
            if len(targets):
                yield network_input(images, spec.mean, spec.std, device), targets


def network_input(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """uint8 images as the network reads them: normalised, channels-last, on `device`."""
    x = normalise(images.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=CHANNELS_LAST)


@torch.no_grad()
def collect_scores(net: BoostNet, source: Source, device: torch.device) -> tuple[ExitScores, int]:
    """Every exit's scores on the split, and how many unreadable files were skipped."""
    net.eval()
    skipped = [0]
    parts = [
        ExitScores.from_logits(torch.stack(net(x)).float().cpu(), targets)
        for x, targets in source.batches(device, skipped)
    ]
    return ExitScores.cat(parts, net.n_exits), skipped[0]


@dataclass(frozen=True)
class Exited:
    """Where the samples of one batch left: class, confidence (max softmax) and 0-based exit."""

    predictions: torch.Tensor  # [b] int64
    confidence: torch.Tensor  # [b] float32
    exits: torch.Tensor  # [b] int64


Waiting = tuple[ExitRunner, torch.Tensor, torch.Tensor]  # runner, rows of its batch, their ids


def _waiting(runner: ExitRunner, rows: torch.Tensor, ids: torch.Tensor) -> Waiting:
    """`rows` of `runner`'s batch, to wait for the next block. When they are under half of it,
    they are copied out now, so that the rest of the batch's state is freed."""
    if 2 * len(rows) >= len(runner.ensemble):
        return runner, rows, ids
    return ExitRunner.gather([(runner, rows)]), torch.arange(len(rows), device=rows.device), ids


class ExitQueue:
    """Budgeted inference for real over a stream of batches: a sample leaves at the first exit
    whose max softmax probability reaches that exit's threshold, and later blocks never see it;
    the last exit takes whatever is left, whatever its threshold.

    The samples that go on past an exit wait there until a full batch of them has gathered (from
    however many input batches), so every block runs on full batches. Run per input batch, the
    late blocks would see a few dozen samples each time, at a new shape each time: on CPU that
    costs almost what a full batch does (per-call overhead, a oneDNN set-up per new shape).
    Each sample's result does not depend on which others share its batch.
    A runner waits with its whole batch's state only while at least half of it goes on (or
    while the rest of it is next in line), so what waits at an exit holds at most twice the
    state of the samples waiting there, plus one batch.
    """

    def __init__(self, net: BoostNet, thresholds: Sequence[float], batch_size: int) -> None:
        if len(thresholds) != net.n_exits:
            raise ValueError(f"need {net.n_exits} thresholds, got {len(thresholds)}")
        self.net, self.thresholds, self.batch_size = net, list(thresholds), batch_size
        # Per exit, what waits for its block: (runner, indices into its batch, their ids).
        self.waiting: list[list[Waiting]] = [[] for _ in thresholds]
        self.left: list[tuple[torch.Tensor, Exited]] = []  # (ids, where they left), in order

    @torch.no_grad()
    def push(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Start a batch of inputs; `ids` (CPU int64, unique) name its samples in the results."""
        self._run(self.net.start(x), ids)
        self._drain(flush=False)

    @torch.no_grad()
    def finish(self) -> tuple[torch.Tensor, Exited]:
        """Run what still waits, in part batches; every sample's result, ordered by id."""
        self._drain(flush=True)
        if not self.left:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, Exited(empty, torch.empty(0), empty)
        ids = torch.cat([i for i, _ in self.left])
        order = ids.argsort()
        parts = [e for _, e in self.left]
        exited = Exited(
            torch.cat([e.predictions for e in parts])[order],
            torch.cat([e.confidence for e in parts])[order],
            torch.cat([e.exits for e in parts])[order],
        )
        self.left = []
        return ids[order], exited

    def _run(self, runner: ExitRunner, ids: torch.Tensor) -> None:
        """One block on `runner`'s samples; those that leave are recorded, the rest wait."""
        index = runner.next_exit
        confidence, predicted = runner.step().softmax(dim=1).max(dim=1)
        if index == self.net.n_exits - 1:
            leaving = torch.ones_like(confidence, dtype=torch.bool)
        else:
            leaving = confidence >= self.thresholds[index]
        gone = leaving.cpu()
        exits = torch.full((int(gone.sum()),), index, dtype=torch.int64)
        done = Exited(predicted[leaving].cpu(), confidence[leaving].float().cpu(), exits)
        self.left.append((ids[gone], done))
        if not gone.all():  # the rest are copied when their next batch is gathered
            rows = (~leaving).nonzero().squeeze(1)
            self.waiting[index + 1].append(_waiting(runner, rows, ids[~gone]))

    def _drain(self, flush: bool) -> None:
        """Run every exit that has a full batch waiting (with `flush`: anything waiting)."""
        for index in range(1, self.net.n_exits):
            while (count := sum(len(w[2]) for w in self.waiting[index])) >= self.batch_size or (
                flush and count
            ):
                self._run(*self._batch(index))

    def _batch(self, index: int) -> tuple[ExitRunner, torch.Tensor]:
        """Up to one batch of the samples waiting at exit `index`, gathered into one runner
        (with their ids); the rest wait on."""
        parts, ids, room = [], [], self.batch_size
        waiting = self.waiting[index]
        while waiting and room:
            runner, rows, row_ids = waiting.pop(0)
            if len(rows) > room:
                waiting.insert(0, (runner, rows[room:], row_ids[room:]))  # taken first next time
                rows, row_ids = rows[:room], row_ids[:room]
            parts.append((runner, rows))
            ids.append(row_ids)
            room -= len(rows)
        return ExitRunner.gather(parts), torch.cat(ids)


@dataclass(frozen=True)
class EarlyExitRun:
    predictions: torch.Tensor  # [n] predicted class
    exits: torch.Tensor  # [n] 0-based exit each sample left at
    targets: torch.Tensor  # [n] (without any skipped unreadable files)
    seconds: float


def early_exit(
    net: BoostNet, source: Source, thresholds: list[float], device: torch.device
) -> EarlyExitRun:
    """An `ExitQueue` over a whole split at the source's batch size, timed."""
    net.eval()
    queue = ExitQueue(net, thresholds, source.batch_size)
    all_targets, seen = [], 0
    start_time = time.perf_counter()
    for x, targets in source.batches(device):
        queue.push(x, torch.arange(seen, seen + len(targets)))
        all_targets.append(targets)
        seen += len(targets)
    _, exited = queue.finish()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time
    return EarlyExitRun(exited.predictions, exited.exits, torch.cat(all_targets), seconds)


@torch.no_grad()
def time_all_exits(net: BoostNet, source: Source, device: torch.device) -> float:
    """Wall time of running every exit on every sample: the reference for measured speedups."""
    net.eval()
    start_time = time.perf_counter()
    for x, _ in source.batches(device):
        net(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start_time


def eval_source(params: Params, split: AnySplit, batch_size: int, augment: bool = False) -> Source:
    """How a stage outside Ray reads `split`: folder datasets from data.root with the loader
    processes this machine's CPUs allow (train.loader_workers overrides); `augment` applies the
    training augmentation (seeded), as the reference's calibration effectively does."""
    kind = params.train.augment if augment else "none"
    if not params.data.is_folder:
        return Source(split, params.data, batch_size, augment=kind, seed=params.seed)
    workers = default_loader_workers(os.cpu_count() or 1, params.train.loader_workers)
    root = Path(params.data.root)
    return Source(split, params.data, batch_size, root, workers, kind, params.seed)


def load_model(params: Params, path: Path, device: torch.device) -> BoostNet:
    """The train stage's selected weights in a fresh BoostNet (tensors only, never pickles),
    batch-norm folded into the convolutions for inference."""
    net = BoostNet.from_params(params)
    state = load_checkpoint(path, "retrain it with `dvc repro -s train -f`")
    net.load_state_dict(state["model"])
    return fold_batch_norm(net.eval()).to(device, memory_format=CHANNELS_LAST)


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """Every conv followed by a batch-norm becomes one conv with the norm's scale and shift in
    its weights (eval mode only). Same outputs to float rounding and the same counted FLOPs
    (batch-norm counts nothing), but a memory pass less per layer, which matters most in the
    full-resolution first block."""
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    return net


def exit_costs(net: BoostNet, params: Params) -> list[int]:
    return count_exit_costs(net.backbone, params.input_shape).flops
