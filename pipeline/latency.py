"""Early exit one image at a time: the latency a request-serving deployment sees (batch 1).

There is nothing to gather at batch 1, so the image runs its blocks in turn and leaves at the
first exit whose max softmax probability reaches that exit's threshold. Each decision reads the
confidence back from the device, which is part of what early exit costs at batch 1.
"""

from __future__ import annotations

import time

import torch

from pipeline.boosting import BoostNet
from pipeline.data import AnySplit
from pipeline.evaluation import EarlyExitRun, Source


def sample(split: AnySplit, size: int, seed: int) -> AnySplit:
    """A seeded sample of `size` images (all of them if the split is smaller), in split order."""
    if size >= len(split):
        return split
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size]
    return split.subset(chosen.sort().values)


@torch.no_grad()
def early_exit_one_at_a_time(
    net: BoostNet, source: Source, thresholds: list[float], device: torch.device
) -> EarlyExitRun:
    """Every image of `source` alone through its exits, timed from the first read to the last
    decision (input decoding included, as in the batched run)."""
    net.eval()
    last = net.n_exits - 1
    predictions, exits, targets = [], [], []
    start_time = time.perf_counter()
    for x, target in source.batches(device):
        for image, label in zip(x.split(1), target, strict=True):
            runner = net.start(image)
            for index in range(net.n_exits):
                confidence, predicted = runner.step().softmax(dim=1).max(dim=1)
                if index == last or float(confidence) >= thresholds[index]:
                    break
            predictions.append(int(predicted))
            exits.append(index)
            targets.append(int(label))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time
    return EarlyExitRun(
        torch.tensor(predictions), torch.tensor(exits), torch.tensor(targets), seconds
    )
