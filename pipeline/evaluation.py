"""Scoring a trained BoostNet: every exit's logits, anytime accuracy, and real early exit.

`early_exit` runs the test set block by block and removes samples from the batch as they exit
(SPEC section 6), so measured wall time shows the saving that expected FLOPs only predict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.augment import normalise
from pipeline.boosting import BoostNet
from pipeline.config import Params
from pipeline.data import Split
from pipeline.datasets import DatasetSpec
from pipeline.flops import count_exit_costs

# Inference runs channels-last: on CPU it makes MSDNet's small convolutions ~1.5x faster (in
# training the batch-norm backward pass loses that gain again).
CHANNELS_LAST = torch.channels_last


def _batches(split: Split, batch_size: int, spec: DatasetSpec, device: torch.device):
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device)
        yield start, normalise(images, spec.mean, spec.std).contiguous(memory_format=CHANNELS_LAST)


@torch.no_grad()
def collect_logits(
    net: BoostNet, split: Split, spec: DatasetSpec, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Every exit's logits on `split`, shape [n_exits, n_samples, n_classes] (float32, CPU)."""
    net.eval()
    parts = [
        torch.stack(net(x)).float().cpu() for _, x in _batches(split, batch_size, spec, device)
    ]
    return torch.cat(parts, dim=1)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[float]:
    """Per-exit top-k accuracy in % from [n_exits, n, C] logits."""
    k = min(k, logits.shape[-1])
    hits = (logits.topk(k, dim=-1).indices == targets[None, :, None]).any(dim=-1)
    return (100.0 * hits.float().mean(dim=1)).tolist()


@dataclass(frozen=True)
class EarlyExitRun:
    predictions: torch.Tensor  # [n] predicted class
    exits: torch.Tensor  # [n] 0-based exit each sample left at
    seconds: float


@torch.no_grad()
def early_exit(
    net: BoostNet,
    split: Split,
    thresholds: list[float],
    spec: DatasetSpec,
    batch_size: int,
    device: torch.device,
) -> EarlyExitRun:
    """Budgeted inference for real: a sample leaves at the first exit whose max softmax
    probability reaches that exit's threshold, and later blocks never see it. `thresholds`
    ends with -inf, so the last exit takes whatever is left."""
    net.eval()
    n = len(split)
    predictions = torch.empty(n, dtype=torch.int64)
    exits = torch.empty(n, dtype=torch.int64)
    start_time = time.perf_counter()
    for start, x in _batches(split, batch_size, spec, device):
        remaining = torch.arange(start, start + len(x))
        runner = net.start(x)
        for index in range(net.n_exits):
            logits = runner.step()
            confidence, predicted = logits.softmax(dim=1).max(dim=1)
            leaving = confidence >= thresholds[index]  # the last threshold is -inf
            if leaving.all():
                predictions[remaining] = predicted.cpu()
                exits[remaining] = index
                break
            if leaving.any():
                gone = leaving.cpu()
                predictions[remaining[gone]] = predicted[leaving].cpu()
                exits[remaining[gone]] = index
                remaining = remaining[~gone]
                runner.keep(~leaving)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EarlyExitRun(predictions, exits, time.perf_counter() - start_time)


@torch.no_grad()
def time_all_exits(
    net: BoostNet, split: Split, spec: DatasetSpec, batch_size: int, device: torch.device
) -> float:
    """Wall time of running every exit on every sample: the reference for measured speedups."""
    net.eval()
    start_time = time.perf_counter()
    for _, x in _batches(split, batch_size, spec, device):
        net(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start_time


def load_model(params: Params, path: Path, device: torch.device) -> BoostNet:
    """The train stage's selected weights in a fresh BoostNet (tensors only, never pickles)."""
    net = BoostNet.from_params(params)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return net.to(device, memory_format=CHANNELS_LAST).eval()


def exit_costs(net: BoostNet, params: Params) -> list[int]:
    size = params.data.spec.image_size
    return count_exit_costs(net.backbone, (params.in_channels, size, size)).flops
