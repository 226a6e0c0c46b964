"""Training-step throughput (images/s) of BoostNet on this machine.

One step = forward through every exit, boosted loss, backward, SGD step, at batch 64. Two figures
per params file: the step alone on a fixed batch, and the step with our data path (a random batch
drawn from an in-memory uint8 training set, crop+flip augmentation when the params ask for it,
normalisation). For a RANet params file, `--reference PATH` (a checkout of the BoostNet authors'
code, SHI-Labs/Boosted-Dynamic-Networks; skipped when absent) adds the reference's own step on
the same batch: its RANet and ensemble wrapper, its boosted loss loop, the same SGD settings.
Repeats of all variants are interleaved and the medians reported, since the machine is shared.
Run: `python benchmarks/train_step.py [--threads 2] [--reference /tmp/bdn] [PARAMS ...]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.augment import normalise, random_crop_flip
from pipeline.boosting import BoostNet
from pipeline.config import Params, load_params

DEFAULT_FILES = [
    "params.yaml",
    "configs/cifar100-msdnet-anytime.yaml",
    "configs/cifar100-ranet-anytime.yaml",
]
Step = Callable[[], None]


def _sgd(params: Params, module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        module.parameters(),
        lr=params.train.lr,
        momentum=params.train.momentum,
        weight_decay=params.train.weight_decay,
    )


def _data(params: Params, batch_size: int) -> tuple[Callable[[bool], tuple], torch.Tensor]:
    """A batch source (fixed, or drawn and augmented like training) over a random uint8 set."""
    spec = params.data.spec
    shape = (params.in_channels, spec.image_size, spec.image_size)
    generator = torch.Generator().manual_seed(0)
    dataset = torch.randint(0, 256, (10_000, *shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, params.num_classes, (10_000,), generator=generator)
    fixed = normalise(dataset[:batch_size], spec.mean, spec.std), labels[:batch_size]

    def next_batch(with_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not with_data:
            return fixed
        index = torch.randint(0, len(dataset), (batch_size,))
        images = dataset[index]
        if params.train.augment == "crop-flip":
            images = random_crop_flip(images, padding=4)
        return normalise(images, spec.mean, spec.std), labels[index]

    return next_batch, fixed[0]


def our_step(params: Params, batch_size: int, with_data: bool) -> Step:
    torch.manual_seed(0)
    net = BoostNet.from_params(params).train()
    optimiser = _sgd(params, net)
    next_batch, _ = _data(params, batch_size)

    def step() -> None:
        x, y = next_batch(with_data)
        loss = net.total_loss(net.exit_losses(net(x), y))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def reference_step(params: Params, batch_size: int, root: Path) -> Step | None:
    """The reference's training step for a RANet params file, or None where it cannot build it
    (no checkout, or a model its code does not cover: grey images, custom heads)."""
    m = params.model
    if not (root / "models" / "ranet.py").exists() or m.arch != "ranet":
        return None
    if params.in_channels != 3 or m.head_channels is not None or not m.bn_after:
        return None
    sys.path.insert(0, str(root))
    from models.dynamic_net_ranet import DynamicNet
    from models.ranet import RANet

    n = m.n_exits
    args = types.SimpleNamespace(
        arch="ranet",
        dataset=params.data.dataset,
        nBlocks=m.n_blocks,
        block_step=m.n_blocks,
        stepmode=m.step_mode,
        step=m.step,
        nChannels=m.n_channels,
        growthRate=m.growth_rate,
        scale_list=list(m.scale_list),
        grFactor=list(m.gr_factor),
        bnFactor=list(m.bn_factor),
        nScales=len(m.scale_list),
        compress_factor=m.compress_factor,
        reduction=m.reduction,
        ensemble_reweight=params.boost.temperatures(n),
    )
    torch.manual_seed(0)
    backbone = RANet(args)
    model = DynamicNet(backbone, args)
    model.train_all()
    optimiser = _sgd(params, backbone)
    next_batch, _ = _data(params, batch_size)
    x, y = next_batch(False)

    def step() -> None:  # the reference's train loop body, on CPU
        preds, ensembles = model.forward_all(x, n - 1)
        loss = 0
        for stage in range(n):
            with torch.no_grad():
                earlier = ensembles[stage]
                if not isinstance(earlier, torch.Tensor):
                    earlier = torch.full((len(x), params.num_classes), float(earlier))
            loss = loss + F.cross_entropy(preds[stage] + earlier.detach(), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    return step


def compare(steps: dict[str, Step], batch_size: int, n_steps: int, repeats: int) -> dict:
    """Median images/s of each variant, their timed repeats interleaved."""
    for step in steps.values():
        for _ in range(3):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n_steps):
                step()
            rates[name].append(n_steps * batch_size / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="*", default=DEFAULT_FILES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", type=Path, default=Path("/tmp/bdn"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}")
    for path in args.params:
        params = load_params(path)
        steps = {
            "step only": our_step(params, args.batch_size, with_data=False),
            "step + data": our_step(params, args.batch_size, with_data=True),
        }
        reference = reference_step(params, args.batch_size, args.reference)
        if reference is not None:
            steps["reference step"] = reference
        rates = compare(steps, args.batch_size, args.steps, args.repeats)
        for name, rate in rates.items():
            print(f"{path:45s} {name:15s} {rate:8.1f} images/s")
        if reference is not None:
            ratio = rates["step only"] / rates["reference step"]
            print(f"{path:45s} ours / reference (step only): {ratio:.2f}x")


if __name__ == "__main__":
    main()
