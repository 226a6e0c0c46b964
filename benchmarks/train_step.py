"""Training-step throughput (images/s) of BoostNet on this machine.

One step = forward through every exit, boosted loss, backward, SGD step, at batch 64. Two figures
per params file: the step alone on a fixed batch, and the step with our data path (a random batch
drawn from an in-memory uint8 training set, crop+flip augmentation when the params ask for it,
normalisation). Run: `python benchmarks/train_step.py [--threads 2] [PARAMS ...]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.augment import normalise, random_crop_flip
from pipeline.boosting import BoostNet
from pipeline.config import Params, load_params

DEFAULT_FILES = ["params.yaml", "configs/cifar100-msdnet-anytime.yaml"]


def measure(params: Params, batch_size: int, steps: int, repeats: int, with_data: bool) -> float:
    torch.manual_seed(0)
    spec = params.data.spec
    net = BoostNet.from_params(params).train()
    optimiser = torch.optim.SGD(
        net.parameters(),
        lr=params.train.lr,
        momentum=params.train.momentum,
        weight_decay=params.train.weight_decay,
    )
    shape = (params.in_channels, spec.image_size, spec.image_size)
    dataset = torch.randint(0, 256, (10_000, *shape), dtype=torch.uint8)
    labels = torch.randint(0, params.num_classes, (10_000,))
    fixed_x = normalise(dataset[:batch_size], spec.mean, spec.std)
    fixed_y = labels[:batch_size]

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if not with_data:
            return fixed_x, fixed_y
        index = torch.randint(0, len(dataset), (batch_size,))
        images = dataset[index]
        if params.train.augment == "crop-flip":
            images = random_crop_flip(images, padding=4)
        return normalise(images, spec.mean, spec.std), labels[index]

    def step() -> None:
        x, y = next_batch()
        loss = net.total_loss(net.exit_losses(net(x), y))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="*", default=DEFAULT_FILES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}")
    for path in args.params:
        params = load_params(path)
        for with_data in (False, True):
            rate = measure(params, args.batch_size, args.steps, args.repeats, with_data)
            label = "step + data" if with_data else "step only  "
            print(f"{path:45s} {label} {rate:8.1f} images/s")


if __name__ == "__main__":
    main()
