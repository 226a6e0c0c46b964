"""Training BoostNet with Ray Train: one function per worker, DDP when there are several.

Each epoch every worker trains on its shard of a seeded permutation, the held-out split is scored
(sharded, counts summed across workers), and rank 0 reports a checkpoint holding the latest state
and the weights `train.select` keeps: the last epoch's, or the best so far on the held-out split
(never the test split) by `train.select_metric`, the mean top-1 over exits or the last exit's.

Resuming: Ray Train keeps the reported checkpoints under `<storage>/<run name>`, and the run name
is a hash of everything that shapes training (params and data fingerprint). After a crash, even a
`kill -9` of the driver, the next run with the same params finds that snapshot and
`ray.train.get_checkpoint()` hands the latest state back to the workers; worker or node failures
within a run restart from it too (`FailureConfig`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from rich.console import Console

from pipeline import tracking
from pipeline.augment import batch_augment, normalise
from pipeline.boosting import BoostNet, effective_samples
from pipeline.config import ConfigError, Params, TrainConfig
from pipeline.data import AnySplit, FileSplit, split_from
from pipeline.devices import describe
from pipeline.folders import DatasetError
from pipeline.inputs import BadImage, check_bad, default_loader_workers, eval_batches, file_loader
from pipeline.interrupts import as_ctrl_c, sigint_handler_restored
from pipeline.io import CorruptFile, load_arrays, load_checkpoint
from pipeline.rayenv import check_prepared
from pipeline.storage import REACH_STORAGE, REACH_TRACKING, Storage, check_nodes_reach
from pipeline.verbosity import library_log_level, quiet_driver, quiet_worker


def selection_score(config: TrainConfig, val_top1: list[float]) -> float:
    """What `train.select: best` maximises over epochs; NaN without a held-out split."""
    if not val_top1:
        return math.nan
    return val_top1[-1] if config.select_metric == "last-exit" else sum(val_top1) / len(val_top1)


def keeps(config: TrainConfig, score: float, kept_score: float) -> bool:
    """Whether this epoch's weights replace the kept ones (`last`: always; ties go to later)."""
    return config.select == "last" or score >= kept_score


def run_name(params: Params, data_fingerprint: str) -> str:
    """Same params and data -> same name, so an interrupted run is found and resumed."""
    shaping = params.model_dump(mode="json", include={"seed", "data", "model", "boost", "train"})
    del shaping["train"]["compile"]  # how the step runs, not what it learns: resumable either way
    blob = json.dumps([shaping, data_fingerprint], sort_keys=True).encode()
    return "train-" + hashlib.sha256(blob).hexdigest()[:12]


def make_optimizer(net: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
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


COMPILE_AUTO_EPOCHS = 20  # CPU compilation takes minutes; a step ~1.2x faster repays it by then


def compiles(config: TrainConfig, device: torch.device, epochs: int) -> bool:
    """Resolve `train.compile`: `auto` compiles on CUDA, and on CPU for long runs only."""
    if config.compile != "auto":
        return config.compile
    return device.type == "cuda" or epochs >= COMPILE_AUTO_EPOCHS


def compile_mode(device: torch.device, world: int) -> str:
    """On one GPU, CUDA graphs: an early-exit network's step is hundreds of small kernels, so
    launches, not arithmetic, bound it (3.4x the eager step on an H200, where the default mode
    gained nothing; benchmarks/train_step.py). Under DDP, whose gradient hooks run between
    graph pieces, and on CPU, the default mode."""
    return "reduce-overhead" if device.type == "cuda" and world == 1 else "default"


def ddp_options(net: BoostNet, params: Params) -> dict[str, bool]:
    """DDP searches for parameters that got no gradient after every backward (a pass over the
    autograd graph) only when some exist, as when MSDNet's last block computes finer scales no
    head reads: found once, from one backward of a copy on a blank batch."""
    probe = copy.deepcopy(net).eval()  # eval: batch statistics of two blank images are moot
    sum(z.sum() for z in probe(torch.zeros(2, *params.input_shape))).backward()
    unused = any(p.grad is None for p in probe.parameters() if p.requires_grad)
    return {"find_unused_parameters": unused}


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


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (the history records where each epoch ran)."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def unwrap(net: torch.nn.Module) -> BoostNet:
    """The BoostNet inside a DDP wrapper (or the net itself): plain parameter names."""
    return getattr(net, "module", net)


class _Progress:
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

    def epoch(self, record: dict[str, Any]) -> None:
        accuracy = " ".join(f"{v:.2f}" for v in record["val_top1"]) or "- (no held-out split)"
        self.console.print(
            f"[bold green]epoch {record['epoch']}[/] val top-1/exit [green]{accuracy}[/] "
            f"({record['epoch_seconds']:.1f}s)"
        )


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
            self.loader = ray.train.torch.prepare_data_loader(
                file_loader(
                    self.train_split,
                    self.root,
                    self.params.data,
                    self.params.train.batch_size,
                    train=self.params.train.augment == "random-resized-crop",
                    workers=self.loader_workers,
                    sampler=self.sampler,
                    pin_memory=self.device.type == "cuda",
                ),
                add_dist_sampler=False,
            )

    def batches(self, epoch: int) -> Any:
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
    )


def start_worker(cpus: float) -> tuple[int, int, torch.device]:
    """In a Ray Train worker: libraries quieted, one torch thread per CPU it holds; returns
    its rank, the number of workers and its device."""
    quiet_worker()
    torch.set_num_threads(max(1, int(cpus)))
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def worker_net(
    net: BoostNet, params: Params, device: torch.device, ray_train: bool = True
) -> torch.nn.Module:
    """The net on this worker's device, channels-last on CUDA. In a Ray Train worker it goes
    through Train's `prepare_model` (DDP when there are several workers, batch-norm synced
    across them if `train.scaling.sync_bn`); a Tune trial in its own process just moves it."""
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if not ray_train:
        return net.to(device)
    if params.train.scaling.sync_bn and ray.train.get_context().get_world_size() > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return ray.train.torch.prepare_model(net, parallel_strategy_kwargs=ddp_options(net, params))


def report_checkpoint(
    report: Callable[..., None],
    checkpoint_type: type[ray.train.Checkpoint],
    metrics: dict[str, Any],
    files: dict[str, Any],
) -> None:
    """Save, then report: each object of `files` is written (torch.save) under its name in a
    fresh folder, and `report` (Train's or Tune's) sends the metrics with that folder as the
    checkpoint, which Ray copies to the run's storage before the folder goes."""
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            torch.save(content, Path(folder) / name)
        report(metrics, checkpoint=checkpoint_type.from_directory(folder))


def read_checkpoint(checkpoint: ray.train.Checkpoint, *names: str) -> list[Any]:
    """The files `report_checkpoint` saved, loaded as tensors and plain containers only."""
    with checkpoint.as_directory() as folder:
        return [load_checkpoint(Path(folder) / name) for name in names]


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    workers: int,
    cpus: float,
    gpus: float,
    name: str,
    storage: Storage,
    **run_options: Any,
) -> TorchTrainer:
    """A Ray Train job of `workers` workers, each holding `cpus` CPUs and `gpus` GPUs, named
    `name` under `storage`, logging at our verbosity; `run_options` go to its RunConfig."""
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            logging_config=ray.LoggingConfig(log_level=library_log_level()),
            **run_options,
        ),
    )


def train_epoch(fit: Fit, epoch: int, progress: _Progress | None = None) -> dict[str, Any]:
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
        fractions, mean_losses = effective_samples(losses)
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
    train_stats = _all_reduce(torch.stack([loss_sum, effective_sum]) / steps) / world
    stats = {
        "train_loss": train_stats[0].tolist(),
        "effective_samples": train_stats[1].tolist(),
        "lr": fit.optimiser.param_groups[0]["lr"],
        "images_per_second": seen * world / (time.perf_counter() - start - compile_seconds),
    }
    if compile_seconds:
        stats["compile_seconds"] = compile_seconds
    if fit.loader is not None:
        stats["skipped_images"] = int(_all_reduce(torch.tensor([skipped], device=device)).item())
    return stats


# Errors that recur on every restart (same data, same code, same file): Ray's FailureConfig
# should restart only after a lost worker or node, never to meet these again.
DETERMINISTIC: tuple[type[Exception], ...] = (BadImage, DatasetError, CorruptFile, ConfigError)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker. A deterministic error (an unreadable image or file, a
    bad setting) is written down for the driver, and Ray's restarts after it (FailureConfig)
    stop at once instead of failing the same way again. (The note goes to the run's storage,
    which the driver reads whichever node the worker ran on.)"""
    storage, marker = config["storage"], config["error_marker"]
    if storage.exists(marker):
        _raise_recorded(storage, marker)
    try:
        _train_worker(config)
    except DETERMINISTIC as exc:
        storage.write_text(marker, json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise


def _raise_recorded(storage: Storage, marker: str) -> None:
    """The deterministic error a worker wrote down, as its own type: one line, no traceback."""
    recorded = json.loads(storage.read_text(marker))
    kind = next(cls for cls in DETERMINISTIC if cls.__name__ == recorded["type"])
    raise kind(recorded["message"])


def _train_worker(config: dict[str, Any]) -> None:
    params = Params.model_validate(config["params"])
    train_cfg = params.train
    rank, world, device = start_worker(train_cfg.scaling.cpus_per_worker)
    torch.manual_seed(params.seed)

    arrays = ray.get(config["prepared"])  # from the object store: no worker reads our disk
    train_split, val_split = split_from(arrays, "train"), split_from(arrays, "val")
    del arrays
    val_shard = val_split.subset(torch.arange(len(val_split))[rank::world])  # may be empty
    root = Path(config["root"]) if config["root"] else None
    loaders = default_loader_workers(train_cfg.scaling.cpus_per_worker, train_cfg.loader_workers)

    net = worker_net(BoostNet.from_params(params), params, device)
    nodes = _node_ids(world)
    if rank == 0:
        Console().print(f"{world} worker(s) on Ray node(s) {' '.join(n[:8] for n in nodes)}")
    fit = make_fit(params, net, train_split, device, rank, world, train_cfg.epochs, root, loaders)
    start_epoch, history, best = 0, [], {"score": -1.0, "epoch": 0, "state": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, best_saved = read_checkpoint(checkpoint, "state.pt", "best.pt")
        start_epoch, history = fit.restore(state), state["history"]
        best = {
            "score": best_saved["score"],
            "epoch": best_saved["epoch"],
            "state": best_saved["model"],
        }
        if rank == 0:
            Console().print(f"[yellow]resuming after epoch {start_epoch}[/]")

    progress = _Progress(train_cfg.epochs, start_epoch) if rank == 0 else None
    for epoch in range(start_epoch, train_cfg.epochs):
        epoch_start = time.perf_counter()
        stats = train_epoch(fit, epoch, progress)
        val_top1 = []  # data.val_size 0: nothing held out to score
        if len(val_split):
            correct = _all_reduce(exit_correct(net, val_shard, params, device, root, loaders))
            if isinstance(val_split, FileSplit):  # the last entry counts unreadable files skipped
                stats["skipped_images"] += int(correct[-1])
                correct = correct[:-1]
            val_top1 = (100.0 * correct.float() / len(val_split)).tolist()
        record = {
            "epoch": epoch + 1,
            **stats,
            "val_top1": val_top1,
            **({"val_mean_top1": sum(val_top1) / len(val_top1)} if val_top1 else {}),
            "epoch_seconds": time.perf_counter() - epoch_start,
            "nodes": nodes,
        }
        history.append(record)
        score = selection_score(train_cfg, val_top1)
        if keeps(train_cfg, score, best["score"]):
            best = {
                "score": score,
                "epoch": epoch + 1,
                "state": {k: v.detach().cpu().clone() for k, v in unwrap(net).state_dict().items()},
            }
        if progress:
            progress.epoch(record)
        _report(fit, record, history, best, config.get("log_to"))


def _device_name(net: torch.nn.Module) -> str:
    """The run's device tag: cpu, or cuda and the GPU's name."""
    return describe(next(net.parameters()).device)


def _report(
    fit: Fit, record: dict, history: list, best: dict, log_to: dict[str, str] | None
) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint, then logs the
    epoch to the MLflow run in `log_to` (URI and run id), if any."""
    metrics = {k: v for k, v in record.items() if not isinstance(v, list)}
    if fit.rank != 0:
        ray.train.report(metrics)
        return
    state = fit.state(record["epoch"], history=history, device=_device_name(fit.net))
    kept = {"model": best["state"], "epoch": best["epoch"], "score": best["score"]}
    report_checkpoint(
        ray.train.report, ray.train.Checkpoint, metrics, {"state.pt": state, "best.pt": kept}
    )
    if log_to:
        tracking.log_epoch(log_to, record)


@dataclass
class TrainOutcome:
    model_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]]
    device: str


AUTO_CPU_WORKERS = 2  # two 1-thread DDP workers beat one 2-thread worker on 2 cores


def require_resources(
    what: str, key: str, workers: int, per_worker: float, kind: str, have: float, extra: float = 0
) -> None:
    """A Ray job asking for more than the whole cluster has would wait forever: refuse it at
    once, naming the key that asked and what the cluster holds."""
    needed = workers * per_worker + extra
    if needed > have + 1e-9:
        raise ConfigError(
            f"{key}: {what} needs {needed:g} {kind}s ({workers} worker(s) x {per_worker:g}) "
            f"but the Ray cluster has {have:g}"
        )


@dataclass(frozen=True)
class Layout:
    workers: int
    use_gpu: bool


def worker_layout(params: Params, cluster: dict[str, float]) -> Layout:
    """Resolve `auto` against the cluster: one worker per GPU when it has GPUs, else the CPU
    layout; then refuse any layout the cluster cannot hold (training would hang in Ray)."""
    scaling = params.train.scaling
    gpus = cluster.get("GPU", 0.0)
    use_gpu = gpus > 0 if scaling.use_gpu == "auto" else bool(scaling.use_gpu)
    workers = scaling.workers
    if workers == "auto":
        fit_cpus = int(cluster.get("CPU", 0.0) // scaling.cpus_per_worker)
        workers = max(1, int(gpus) if use_gpu else min(AUTO_CPU_WORKERS, fit_cpus))
    key = "train.scaling.workers" if scaling.workers != "auto" else "train.scaling.use_gpu"
    if use_gpu:
        require_resources("training", key, workers, 1, "GPU", gpus)
    cpu_key = "train.scaling.cpus_per_worker" if scaling.workers == "auto" else key
    require_resources(
        "training", cpu_key, workers, scaling.cpus_per_worker, "CPU", cluster.get("CPU", 0.0)
    )
    return Layout(workers, use_gpu)


def train(
    params: Params,
    prepared: Path,
    storage: Storage,
    name: str,
    root: Path | None = None,
    log_to: dict[str, str] | None = None,
) -> TrainOutcome:
    """Fit on Ray Train (Ray must be initialised) and return the selected weights. The
    prepared splits reach the workers through Ray's object store; checkpoints go to `storage`
    (see pipeline/storage.py). `root`: where a folder dataset's files are (the manifest is
    relative to it), which every node must read; `log_to`: the MLflow store (`uri`) and run
    (`run_id`) that receive each epoch's metrics."""
    layout = worker_layout(params, ray.cluster_resources())
    needs = {"CPU": params.train.scaling.cpus_per_worker, "GPU": 1 if layout.use_gpu else 0}
    reach = {str(root.resolve()): REACH_STORAGE} if root else {}
    if log_to and (store := tracking.local_store(log_to["uri"])):  # rank 0 logs each epoch
        reach[store] = REACH_TRACKING
    check_nodes_reach(storage, needs, reach)
    # A damaged file fails here in one line, not in every worker.
    arrays = ray.put(load_arrays(prepared))
    error_marker = f"{name}.error"
    storage.delete(error_marker)
    trainer = torch_trainer(
        _worker_loop,
        {
            "params": params.model_dump(mode="json"),
            "prepared": arrays,
            "root": str(root.resolve()) if root else None,
            "storage": storage,
            "error_marker": error_marker,
            "log_to": log_to,
        },
        workers=layout.workers,
        cpus=params.train.scaling.cpus_per_worker,
        gpus=1 if layout.use_gpu else 0,
        name=name,
        storage=storage,
        failure_config=ray.train.FailureConfig(max_failures=2),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
    )
    try:
        with sigint_handler_restored():
            result = trainer.fit()
    except SystemExit:  # how fit() ends after Train's Ctrl-C handler aborted the run
        raise KeyboardInterrupt from None
    except Exception:
        if storage.exists(error_marker):  # one line naming the cause, not Ray's wrapped traceback
            try:
                _raise_recorded(storage, error_marker)
            finally:
                storage.delete(error_marker)
        raise
    state, best = read_checkpoint(result.checkpoint, "state.pt", "best.pt")
    storage.delete(name)  # stage outputs now hold what matters
    return TrainOutcome(best["model"], best["epoch"], state["history"], state["device"])


# Where Ray's state API (the placement-group cleaner's) finds the cluster. Without it the
# cleaner looks for "the" cluster on the machine and, while another command's local cluster
# runs, fails with a traceback ("Found multiple active Ray instances").
API_SERVER = "RAY_API_SERVER_ADDRESS"


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def ray_session() -> Iterator[None]:
    """Ray for a stage or a search, until the block ends however it ends: SIGTERM stays Ctrl-C
    while Ray runs (`ray.init` would make it a bare exit), `ray.shutdown()` runs on an
    interruption too (so the cluster's processes go with us), and the session folder of a
    local cluster we started (under /tmp/ray) is removed after it stops."""
    kwargs = ray_init_kwargs()
    quiet_driver()  # after `import ray`, which sets its loggers' levels
    previous = signal.getsignal(signal.SIGTERM)
    api_server = os.environ.get(API_SERVER)
    if "dashboard_port" in kwargs:  # inherited by the cluster's processes, ours until the end
        os.environ[API_SERVER] = f"http://127.0.0.1:{kwargs['dashboard_port']}"
    session = ray.init(**kwargs).address_info.get("session_dir")
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        yield
    finally:
        started = psutil.Process().children(recursive=True) if "address" not in kwargs else []
        ray.shutdown()
        _stop_leftovers(started)
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "dashboard_port" in kwargs:
            os.environ.pop(API_SERVER, None)
            if api_server is not None:
                os.environ[API_SERVER] = api_server
        if session and "address" not in kwargs:  # never another cluster's folder
            _remove_session(Path(session))


def _stop_leftovers(processes: list[psutil.Process], grace_s: float = 2.0) -> None:
    """After `ray.shutdown()`, the local cluster's processes that are still running (a busy
    Train worker can outlive its raylet for tens of seconds): SIGTERM, then SIGKILL after
    `grace_s`. Only processes this stage started, found by PID before the shutdown."""
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in alive:
        with suppress(psutil.Error):
            process.kill()


def _remove_session(session: Path) -> None:
    latest = session.parent / "session_latest"
    if latest.is_symlink() and latest.resolve() == session.resolve():
        latest.unlink(missing_ok=True)
    shutil.rmtree(session, ignore_errors=True)


def ray_init_kwargs() -> dict[str, Any]:
    """Join the cluster in RAY_ADDRESS, else start a local one that listens on loopback only
    (`rayenv.prepare_ray()` must have run before `import ray`)."""
    check_prepared()
    if os.environ.get("RAY_ADDRESS"):
        return {"address": os.environ["RAY_ADDRESS"]}
    # The Train controller polls its workers every 2 s by default; on short CPU runs that is
    # ~10 s of idle start-up and tear-down. Local clusters inherit this from the driver.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # No spot-instance preemption on one machine; Train's watcher for it logs an ERROR line
    # (its constructor arguments live in the object store) to the console on every run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return {
        "num_cpus": os.cpu_count(),
        # Train's placement-group cleaner asks the dashboard's state API about the controller;
        # without it every check logs a failure. It listens on 127.0.0.1 only, on a port we
        # pick so that the cleaner can be told which cluster is ours (API_SERVER).
        "include_dashboard": True,
        "dashboard_port": free_port(),
        "configure_logging": False,
    }
