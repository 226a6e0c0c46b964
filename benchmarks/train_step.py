"""Training-step throughput (images/s) of BoostNet, eager and compiled, beside the reference's.

One step = forward through every exit, boosted loss, backward, SGD step, at batch 64. Variants
per params file: our step on a fixed batch, eager and `torch.compile`d (the compile time is
printed apart); our step with our data path (a random batch drawn from an in-memory uint8
training set, crop+flip when the params ask for it, normalisation); and with `--reference PATH`
(a checkout of the BoostNet authors' code, SHI-Labs/Boosted-Dynamic-Networks; skipped when
absent) the reference's own step on the same batch: its MSDNet (`msdnet_ge` when
`boost.grad_rescale`) or RANet, its ensemble wrapper and boosted loss loop, the same SGD. On
CUDA (`--device cuda`) our steps run channels-last, as training does, in fp32 and (`--bf16`)
with bf16 autocast (`train.amp`); `--reference-amp` gives the reference autocast too.
Repeats of all variants are interleaved and the medians reported (the machine is shared).
Run: `python benchmarks/train_step.py [--threads 2] [--device cpu|cuda] [--bf16]
[--reference /tmp/bdn] [--compile-modes default reduce-overhead] [PARAMS ...]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections.abc import Callable
from contextlib import nullcontext
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


def _data(
    params: Params, batch_size: int, device: torch.device
) -> Callable[[bool], tuple[torch.Tensor, torch.Tensor]]:
    """A batch source (fixed, or drawn and augmented like training) over a random uint8 set."""
    spec = params.data.spec
    shape = (params.in_channels, spec.image_size, spec.image_size)
    generator = torch.Generator().manual_seed(0)
    dataset = torch.randint(0, 256, (10_000, *shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, params.num_classes, (10_000,), generator=generator)
    fixed = normalise(dataset[:batch_size], spec.mean, spec.std), labels[:batch_size]
    fixed = fixed[0].to(device), fixed[1].to(device)

    def next_batch(with_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not with_data:
            return fixed
        index = torch.randint(0, len(dataset), (batch_size,))
        images = dataset[index]
        if params.train.augment == "crop-flip":
            images = random_crop_flip(images, padding=4)
        images = images.to(device, non_blocking=True)
        return normalise(images, spec.mean, spec.std), labels[index].to(device)

    return next_batch


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, torch.bfloat16) if enabled else nullcontext()


def our_step(
    params: Params,
    batch_size: int,
    device: torch.device,
    with_data: bool,
    compiled: str | None,
    amp: bool = False,
) -> Step:
    """The step `pipeline.fitting.train_epoch` takes: channels-last on CUDA, bf16 autocast
    there when `amp`, the boosted loss in fp32."""
    torch.manual_seed(0)
    net = BoostNet.from_params(params).to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    forward = torch.compile(net, mode=compiled) if compiled else net
    optimiser = _sgd(params, net)
    next_batch = _data(params, batch_size, device)
    amp = cuda and amp

    def step() -> None:
        if compiled == "reduce-overhead":  # CUDA graphs: this step's outputs replace the last's
            torch.compiler.cudagraph_mark_step_begin()
        x, y = next_batch(with_data)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = forward(x)
            loss = net.total_loss(net.exit_losses([z.float() for z in logits], y))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def _reference_backbone(params: Params, root: Path) -> tuple[torch.nn.Module, type] | None:
    """The reference's backbone and ensemble wrapper for these params, or None where its code
    cannot build them (grey images, custom heads, options it does not have)."""
    m = params.model
    if params.in_channels != 3 or m.head_channels is not None:
        return None
    sys.path.insert(0, str(root))
    common = dict(
        arch=m.arch,
        dataset=params.data.dataset,
        nBlocks=m.n_blocks,
        stepmode=m.step_mode,
        step=m.step,
        nChannels=m.n_channels,
        growthRate=m.growth_rate,
        grFactor=list(m.gr_factor),
        bnFactor=list(m.bn_factor),
        reduction=m.reduction,
        num_classes=params.num_classes,
        ensemble_reweight=params.boost.temperatures(m.n_exits),
    )
    if m.arch == "ranet":
        if not (root / "models" / "ranet.py").exists() or not m.bn_after:
            return None
        from models.dynamic_net_ranet import DynamicNet
        from models.ranet import RANet

        args = types.SimpleNamespace(
            **common,
            block_step=m.n_blocks,
            scale_list=list(m.scale_list),
            nScales=len(m.scale_list),
            compress_factor=m.compress_factor,
        )
        return RANet(args), lambda backbone: DynamicNet(backbone, args)
    if not (root / "models" / "msdnet_ge.py").exists():
        return None
    from models.dynamic_net import DynamicNet
    from models.msdnet import MSDNet
    from models.msdnet_ge import MSDNet as MSDNetGE

    args = types.SimpleNamespace(
        **common, base=m.base, nScales=len(m.gr_factor), bottleneck=m.bottleneck, prune=m.prune
    )
    backbone = (MSDNetGE if params.boost.grad_rescale else MSDNet)(args)
    return backbone, lambda backbone: DynamicNet(backbone, args)


def reference_step(
    params: Params, batch_size: int, root: Path, device: torch.device, amp: bool
) -> Step | None:
    """The reference's training step (its loop body, on our device), or None."""
    torch.manual_seed(0)
    built = _reference_backbone(params, root)
    if built is None:
        return None
    backbone, wrap = built
    backbone = backbone.to(device)
    model = wrap(backbone)
    model.train_all()
    optimiser = _sgd(params, backbone)
    x, y = _data(params, batch_size, device)(False)
    n = params.model.n_exits

    def step() -> None:
        with _autocast(device, amp):
            preds, ensembles = model.forward_all(x, n - 1)
            loss = 0
            for stage in range(n):
                with torch.no_grad():
                    earlier = ensembles[stage]
                    if not isinstance(earlier, torch.Tensor):
                        earlier = torch.full(
                            (len(x), params.num_classes), float(earlier), device=device
                        )
                loss = loss + F.cross_entropy(preds[stage] + earlier.detach(), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    return step


def _timed(step: Step, device: torch.device, n_steps: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(
    steps: dict[str, Step], batch_size: int, n_steps: int, repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median images/s of each variant, their timed repeats interleaved; and the warm-up time
    of each (for compiled variants, the compilation)."""
    warmup = {name: _timed(step, device, 3) for name, step in steps.items()}
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            rates[name].append(n_steps * batch_size / _timed(step, device, n_steps))
    return {name: statistics.median(values) for name, values in rates.items()}, warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="*", default=DEFAULT_FILES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", type=Path, default=Path("/tmp/bdn"))
    parser.add_argument("--reference-amp", action="store_true", help="bf16 autocast for it too")
    parser.add_argument(
        "--compile-modes",
        nargs="*",
        default=["default"],
        help="torch.compile modes to time (none: eager only); reduce-overhead = CUDA graphs",
    )
    parser.add_argument("--bf16", action="store_true", help="CUDA: bf16 autocast variants too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        name = torch.cuda.get_device_name()
    else:
        name = f"{args.threads} threads"
    print(f"torch {torch.__version__}, {name}, batch {args.batch_size}")
    for path in args.params:
        params = load_params(path)
        size, cuda = args.batch_size, device.type == "cuda"
        precisions = [False, True] if cuda and args.bf16 else [False]
        steps = {}
        for mode in [None, *args.compile_modes]:
            for amp in precisions:  # bf16: what training runs on CUDA with `train.amp: true`
                name = "eager" if mode is None else f"compiled {mode}"
                name += " bf16" if amp else ""
                steps[name] = our_step(params, size, device, False, compiled=mode, amp=amp)
        if not cuda:
            steps["eager + data"] = our_step(params, size, device, with_data=True, compiled=None)
        reference = reference_step(params, size, args.reference, device, args.reference_amp)
        if reference is not None:
            steps["reference"] = reference
        rates, warmup = compare(steps, size, args.steps, args.repeats, device)
        for variant, rate in rates.items():
            print(f"{path:40s} {variant:13s} {rate:9.1f} images/s (warm-up {warmup[variant]:.1f}s)")
        if reference is not None:
            for variant in rates:
                if variant != "reference":
                    ratio = rates[variant] / rates["reference"]
                    print(f"{path:40s} {variant} / reference: {ratio:.2f}x")


if __name__ == "__main__":
    main()
