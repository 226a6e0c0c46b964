"""What reproducing a paper configuration costs on this machine: projected wall time of the full
training schedule (300 epochs on CIFAR-100, 90 on ImageNet), fp32 (the paper's precision).

Times the training code's own epoch loop (`pipeline.fitting.train_epoch`: augmentation,
forward through every exit, boosted loss, backward, SGD step) over a few steps on generated
uint8 images of the dataset's shape (CIFAR-100: 32x32x3; ImageNet: 224x224x3 through the
ImageNet-stem model), after one warm-up step, and extrapolates to every step of the schedule on
one device. Not included: the per-epoch held-out scoring, evaluation, and ImageNet's JPEG
decoding and random-resized-crop (timed without augmentation). With N equal devices under DDP
the ideal time divides by N.

Run: `python benchmarks/reproduction_cost.py [--steps 3] [--threads 2] [CONFIG ...]`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pipeline.boosting import BoostNet
from pipeline.config import Params, load_params, parse_params
from pipeline.data import Split
from pipeline.fitting import Fit, make_optimizer, make_scheduler, train_epoch

TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167}
DEFAULT_FILES = ["configs/cifar100-msdnet-anytime.yaml", "configs/imagenet-msdnet-anytime.yaml"]


def _timing_params(params: Params) -> Params:
    """One worker, fp32; ImageNet without its (file-based) augmentation."""
    raw = params.model_dump(mode="json")
    raw["train"].update(amp=False)
    raw["train"]["scaling"].update(workers=1)
    if raw["train"]["augment"] == "random-resized-crop":
        raw["train"]["augment"] = "none"
    return parse_params(raw, "timing")


def seconds_per_step(params: Params, steps: int, device: torch.device) -> float:
    spec, batch = params.data.spec, params.train.batch_size
    generator = torch.Generator().manual_seed(0)
    size = (steps * batch, spec.channels, spec.image_size, spec.image_size)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, spec.num_classes, (steps * batch,), generator=generator)
    torch.manual_seed(0)
    net = BoostNet.from_params(params).to(device)
    optimiser = make_optimizer(net, params.train)
    scheduler = make_scheduler(optimiser, params.train, steps)
    warm = Split(images[:batch], targets[:batch])
    train_epoch(Fit(params, net, optimiser, scheduler, warm, device), epoch=0)
    fit = Fit(params, net, optimiser, scheduler, Split(images, targets), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_epoch(fit, epoch=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_FILES)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {where} ({args.threads} threads), fp32, {args.steps} timed steps per config")
    for path in args.configs:
        params = _timing_params(load_params(path))
        per_step = seconds_per_step(params, args.steps, device)
        images = TRAIN_IMAGES[params.data.dataset] - params.data.val_size
        steps_per_epoch = math.ceil(images / params.train.batch_size)
        total = per_step * steps_per_epoch * params.train.epochs
        print(
            f"{path}: {per_step:.3f} s/step at batch {params.train.batch_size} "
            f"({params.train.batch_size / per_step:.1f} img/s); {steps_per_epoch} steps/epoch x "
            f"{params.train.epochs} epochs -> {total / 3600:.1f} h ({total / 86400:.1f} days) "
            "on one such device"
        )


if __name__ == "__main__":
    main()
