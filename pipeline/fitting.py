"""The training loop itself, free of Ray: optimiser and schedule, compile policy, one epoch of
the boosted loss over a worker's shard, held-out scoring, and what `train.select` keeps. Shared
by the Ray Train workers (pipeline/training.py) and Tune trials (pipeline/tuning.py); under DDP
the caller hands in the wrapped net and a loader placed by Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.augment import batch_augment, normalise
from pipeline.boosting import BoostNet, batch_effective_samples
from pipeline.config import Params, TrainConfig
from pipeline.data import AnySplit, FileSplit
from pipeline.epochs import EpochStats
from pipeline.inputs import check_bad, eval_batches, file_loader
from pipeline.progress import Progress


def selection_score(config: TrainConfig, val_top1: list[float]) -> float:
    """What `train.select: best` maximises over epochs; NaN without a held-out split."""
    if not val_top1:
        return math.nan
    return val_top1[-1] if config.select_metric == "last-exit" else sum(val_top1) / len(val_top1)


def keeps(config: TrainConfig, score: float, kept_score: float) -> bool:
    """Whether this epoch's weights replace the kept ones (`last`: always; ties go to later)."""
    return config.select == "last" or score >= kept_score


def make_optimizer(net: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """`train.optimizer`: SGD with momentum, as the paper trains, or AdamW."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        net.parameters(),
        lr=config.lr,
        momentum=config.momentum or 0.0,
        weight_decay=config.weight_decay,
    )


def make_scheduler(
    optimiser: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped after every batch, so short runs still anneal (milestones are in epochs)."""
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
    if config.schedule == "onecycle":
        total = config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=total)
    if config.schedule == "multistep":
        milestones = [m * steps_per_epoch for m in config.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, config.gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimiser, factor=1.0)


COMPILE_AUTO_EPOCHS = 20  # CPU compilation takes minutes; the faster step repays it by then


def compiles(config: TrainConfig, device: torch.device, epochs: int) -> bool:
    """Resolve `train.compile`: `auto` compiles on CUDA, and on CPU for long runs only."""
    if config.compile != "auto":
        return config.compile
    return device.type == "cuda" or epochs >= COMPILE_AUTO_EPOCHS


def compile_mode(device: torch.device, world: int) -> str:
    """On one GPU, CUDA graphs: an early-exit network's step is hundreds of small kernels, so
    launches, not arithmetic, bound it, and the default mode does not remove launches
    (benchmarks/train_step.py measures both). Under DDP, whose gradient hooks run between
    graph pieces, and on CPU, the default mode."""
    return "reduce-overhead" if device.type == "cuda" and world == 1 else "default"


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that overlaps compute on CUDA (pinned source), channels-last there."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def exit_correct(
    net: torch.nn.Module,
    split: AnySplit,
    params: Params,
    device: torch.device,
    root: Path | None = None,
    loader_workers: int = 0,
) -> torch.Tensor:
    """Top-1 hits of every exit on `split`, shape [n_exits] (a sum, for all-reduce); for folder
    datasets one more entry counts the unreadable files skipped."""
    net.eval()
    spec = params.data.spec
    correct = torch.zeros(params.model.n_exits + 1, dtype=torch.int64, device=device)
    batch_size = params.train.eval_batch_size
    for images, targets, bad in eval_batches(split, params.data, batch_size, root, loader_workers):
        correct[-1] += check_bad(bad, params.data)
        if not len(targets):
            continue
        targets = targets.to(device)
        for index, logits in enumerate(
            net(normalise(_to_device(images, device), spec.mean, spec.std))
        ):
            correct[index] += (logits.argmax(dim=1) == targets).sum()
    return correct if isinstance(split, FileSplit) else correct[:-1]


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Summed over the workers under DDP (in place); a lone process's is already the total."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def unwrap(net: torch.nn.Module) -> BoostNet:
    """The BoostNet inside a DDP wrapper (or the net itself): plain parameter names."""
    return getattr(net, "module", net)


def steps_per_epoch(n_train: int, params: Params, world: int = 1) -> int:
    """The same on every worker (DDP needs it): each gets n_train // world samples."""
    return math.ceil((n_train // world) / params.train.batch_size)


@dataclass
class Fit:
    """What one worker trains: the (possibly DDP-wrapped) net, its optimiser and schedule, and
    the training split (each worker takes every world-th sample of a seeded permutation)."""

    params: Params
    net: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_split: AnySplit
    device: torch.device
    rank: int = 0
    world: int = 1
    root: Path | None = None  # folder datasets: data.root, resolved by the driver
    loader_workers: int = 0
    compile: bool = False
    # Folder datasets: hands the loader to the distributed runtime (Ray Train's placement).
    place_loader: Callable[[torch.utils.data.DataLoader], Iterable[Any]] | None = None

    def __post_init__(self) -> None:
        # Full batches run compiled; a short last batch runs eager rather than recompiling for
        # its shape. Checkpoints and evaluation use `net` itself (same weights, plain names).
        self.mode = compile_mode(self.device, self.world)
        self.compiled = torch.compile(self.net, mode=self.mode) if self.compile else None
        self.warm = False  # whether `compiled` has run (compiled) once in this process
        self.loader = None
        if isinstance(self.train_split, FileSplit):
            # Each rank decodes only its shard; drop_last keeps the shards (so DDP steps) equal.
            self.sampler = torch.utils.data.DistributedSampler(
                self.train_split, self.world, self.rank, seed=self.params.seed, drop_last=True
            )
            loader = file_loader(
                self.train_split,
                self.root,
                self.params.data,
                self.params.train.batch_size,
                train=self.params.train.augment == "random-resized-crop",
                workers=self.loader_workers,
                sampler=self.sampler,
                pin_memory=self.device.type == "cuda",
            )
            self.loader = self.place_loader(loader) if self.place_loader else loader

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """This rank's (uint8 images, targets, unreadable files) for one epoch."""
        if self.loader is not None:
            self.sampler.set_epoch(epoch)
            yield from self.loader
            return
        config = self.params.train
        n = len(self.train_split) // self.world * self.world  # equal shards: < world images wait
        order = torch.randperm(
            len(self.train_split),
            generator=torch.Generator().manual_seed(self.params.seed * 100_003 + epoch),
        )[:n][self.rank :: self.world]
        generator = torch.Generator().manual_seed(
            self.params.seed * 100_003 + epoch * 1_009 + self.rank
        )
        for step in range(steps_per_epoch(len(self.train_split), self.params, self.world)):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = batch_augment(self.train_split.images[index], config.augment, generator)
            yield images, self.train_split.targets[index], []

    def state(self, epoch: int, **extra: Any) -> dict[str, Any]:
        """What resuming after `epoch` needs (tensors and plain containers only)."""
        return {
            "model": unwrap(self.net).state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            **extra,
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Load what `state()` saved; returns the number of epochs it had finished."""
        unwrap(self.net).load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["epoch"]


def make_fit(
    params: Params,
    net: torch.nn.Module,
    train_split: AnySplit,
    device: torch.device,
    rank: int,
    world: int,
    epochs: int,
    root: Path | None = None,
    loader_workers: int = 0,
    place_loader: Callable[[torch.utils.data.DataLoader], Iterable[Any]] | None = None,
) -> Fit:
    """A worker's Fit for a run of `epochs` (train.epochs, or tune.epochs for a trial): the
    optimiser, its per-batch schedule over this worker's shard, and `train.compile` resolved."""
    optimiser = make_optimizer(net, params.train)
    per_epoch = steps_per_epoch(len(train_split), params, world)
    scheduler = make_scheduler(optimiser, params.train, per_epoch)
    compile_step = compiles(params.train, device, epochs)
    return Fit(
        params,
        net,
        optimiser,
        scheduler,
        train_split,
        device,
        rank,
        world,
        root,
        loader_workers,
        compile=compile_step,
        place_loader=place_loader,
    )


def train_epoch(fit: Fit, epoch: int, progress: Progress | None = None) -> EpochStats:
    """One pass of the boosted (or joint) loss over this worker's shard. Returns the per-exit
    mean loss and effective-sample fraction (averaged over workers), the lr and images/s."""
    params, device, world = fit.params, fit.device, fit.world
    config, spec = params.train, params.data.spec
    start = time.perf_counter()
    steps = steps_per_epoch(len(fit.train_split), params, world)
    loss_sum = torch.zeros(params.model.n_exits, device=device)
    effective_sum = torch.zeros(params.model.n_exits, device=device)
    amp = device.type == "cuda" and config.amp
    boostnet = unwrap(fit.net)
    fit.net.train()
    seen = skipped = 0
    compile_seconds = 0.0
    for step, (batch, batch_targets, bad) in enumerate(fit.batches(epoch)):
        step_start = time.perf_counter()
        skipped += check_bad(bad, params.data)
        if isinstance(fit.train_split, FileSplit):
            batch = batch_augment(batch, config.augment)
        images, targets = _to_device(batch, device), batch_targets.to(device, non_blocking=True)
        full = len(batch) == config.batch_size
        net = fit.compiled if fit.compiled is not None and full else fit.net
        compiling = net is fit.compiled and not fit.warm
        if compiling and progress:
            progress.compiling()
        if net is fit.compiled and fit.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are done
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(normalise(images, spec.mean, spec.std))
            losses = boostnet.exit_losses([z.float() for z in logits], targets)
            loss = boostnet.total_loss(losses)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch + 1}: the training loss diverged ({loss})")
        fit.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        fit.optimiser.step()
        fit.scheduler.step()
        fractions, mean_losses = batch_effective_samples(losses)
        loss_sum += mean_losses
        effective_sum += fractions
        if compiling:  # compilation is reported apart from the epoch's throughput
            fit.warm = True
            compile_seconds = time.perf_counter() - step_start
            if progress:
                progress.compiled(compile_seconds)
        else:
            seen += len(targets)
        if progress:
            rate = seen * world / (time.perf_counter() - start - compile_seconds)
            progress.step(epoch, step + 1, steps, loss_sum / (step + 1), rate)
    train_stats = all_reduce(torch.stack([loss_sum, effective_sum]) / steps) / world
    stats = EpochStats(
        train_loss=train_stats[0].tolist(),
        effective_samples=train_stats[1].tolist(),
        lr=fit.optimiser.param_groups[0]["lr"],
        images_per_second=seen * world / (time.perf_counter() - start - compile_seconds),
        compile_seconds=compile_seconds or None,
    )
    if fit.loader is not None:
        stats.skipped_images = int(all_reduce(torch.tensor([skipped], device=device)).item())
    return stats
