"""Scoring a trained BoostNet: every exit's scores, anytime accuracy, and real early exit.

`early_exit` runs the test set block by block and removes samples from the batch as they exit,
so measured wall time shows the saving that expected FLOPs only predict. Splits are streamed in
batches (folder datasets decoded by loader processes), and only per-exit scores are kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.augment import normalise
from pipeline.boosting import BoostNet
from pipeline.calibration import ExitScores
from pipeline.config import DataConfig, Params
from pipeline.data import AnySplit
from pipeline.flops import count_exit_costs
from pipeline.inputs import check_bad, default_loader_workers, eval_batches
from pipeline.io import load_checkpoint

# Inference runs channels-last: on CPU it makes MSDNet's small convolutions ~1.5x faster (in
# training the batch-norm backward pass loses that gain again).
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


@torch.no_grad()
def exit_batch(net: BoostNet, x: torch.Tensor, thresholds: list[float]) -> Exited:
    """Budgeted inference for real on one batch: a sample leaves at the first exit whose max
    softmax probability reaches that exit's threshold, and later blocks never see it. The last
    exit takes whatever is left, whatever its threshold."""
    n, last = len(x), net.n_exits - 1
    predictions = torch.empty(n, dtype=torch.int64)
    confidence = torch.empty(n)
    exits = torch.empty(n, dtype=torch.int64)
    remaining = torch.arange(n)
    runner = net.start(x)
    for index in range(net.n_exits):
        exit_confidence, predicted = runner.step().softmax(dim=1).max(dim=1)
        leaving = exit_confidence >= thresholds[index]
        if index == last or leaving.all():
            predictions[remaining] = predicted.cpu()
            confidence[remaining] = exit_confidence.cpu()
            exits[remaining] = index
            break
        if leaving.any():
            gone = leaving.cpu()
            predictions[remaining[gone]] = predicted[leaving].cpu()
            confidence[remaining[gone]] = exit_confidence[leaving].cpu()
            exits[remaining[gone]] = index
            remaining = remaining[~gone]
            runner.keep(~leaving)
    return Exited(predictions, confidence, exits)


@dataclass(frozen=True)
class EarlyExitRun:
    predictions: torch.Tensor  # [n] predicted class
    exits: torch.Tensor  # [n] 0-based exit each sample left at
    targets: torch.Tensor  # [n] (without any skipped unreadable files)
    seconds: float


def early_exit(
    net: BoostNet, source: Source, thresholds: list[float], device: torch.device
) -> EarlyExitRun:
    """`exit_batch` over a whole split, timed."""
    net.eval()
    predictions, exits, all_targets = [], [], []
    start_time = time.perf_counter()
    for x, targets in source.batches(device):
        exited = exit_batch(net, x, thresholds)
        predictions.append(exited.predictions)
        exits.append(exited.exits)
        all_targets.append(targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time
    return EarlyExitRun(torch.cat(predictions), torch.cat(exits), torch.cat(all_targets), seconds)


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
    (batch-norm counts nothing), but a memory pass less per layer: 16-32 % of inference time on
    the default model, most of it in the full-resolution first block."""
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    return net


def exit_costs(net: BoostNet, params: Params) -> list[int]:
    return count_exit_costs(net.backbone, params.input_shape).flops
