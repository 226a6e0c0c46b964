"""Training BoostNet with Ray Train: one function per worker, DDP when there are several.

Each epoch every worker trains on its shard of a seeded permutation, the held-out split is scored
(sharded, counts summed across workers), and rank 0 reports a checkpoint holding the latest state
and the best weights so far. Selection uses the held-out split only: the mean top-1 over all exits.

Resuming: Ray Train keeps the reported checkpoints under `<storage>/<run name>`, and the run name
is a hash of everything that shapes training (params and data fingerprint). After a crash, even a
`kill -9` of the driver, the next run with the same params finds that snapshot and
`ray.train.get_checkpoint()` hands the latest state back to the workers; worker or node failures
within a run restart from it too (`FailureConfig`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from rich.console import Console

from pipeline.augment import normalise, random_crop_flip
from pipeline.boosting import BoostNet, effective_samples
from pipeline.config import Params, TrainConfig
from pipeline.data import Split, load_split
from pipeline.io import load_checkpoint

SELECTION_METRIC = "val_mean_top1"


def run_name(params: Params, data_fingerprint: str) -> str:
    """Same params and data -> same name, so an interrupted run is found and resumed."""
    shaping = params.model_dump(mode="json", include={"seed", "data", "model", "boost", "train"})
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


def augment(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    if config.augment == "crop-flip":
        return random_crop_flip(images, padding=4, generator=generator)
    if config.augment == "none":
        return images
    raise ValueError(f"train.augment: {config.augment} needs the ImageFolder data path")


@torch.no_grad()
def exit_correct(
    net: torch.nn.Module, split: Split, params: Params, device: torch.device
) -> torch.Tensor:
    """Top-1 hits of every exit on `split`, shape [n_exits] (a sum, for all-reduce)."""
    net.eval()
    spec = params.data.spec
    correct = torch.zeros(params.model.n_exits, dtype=torch.int64, device=device)
    for start in range(0, len(split), params.train.eval_batch_size):
        images = split.images[start : start + params.train.eval_batch_size].to(device)
        targets = split.targets[start : start + params.train.eval_batch_size].to(device)
        for index, logits in enumerate(net(normalise(images, spec.mean, spec.std))):
            correct[index] += (logits.argmax(dim=1) == targets).sum()
    return correct


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


def _unwrap(net: torch.nn.Module) -> BoostNet:
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

    def epoch(self, record: dict[str, Any]) -> None:
        accuracy = " ".join(f"{v:.2f}" for v in record["val_top1"])
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
    train_split: Split
    device: torch.device
    rank: int = 0
    world: int = 1

    def state(self, epoch: int, **extra: Any) -> dict[str, Any]:
        """What resuming after `epoch` needs (tensors and plain containers only)."""
        return {
            "model": _unwrap(self.net).state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            **extra,
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Load what `state()` saved; returns the number of epochs it had finished."""
        _unwrap(self.net).load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["epoch"]


def train_epoch(fit: Fit, epoch: int, progress: _Progress | None = None) -> dict[str, Any]:
    """One pass of the boosted (or joint) loss over this worker's shard. Returns the per-exit
    mean loss and effective-sample fraction (averaged over workers), the lr and images/s."""
    params, device, world = fit.params, fit.device, fit.world
    config, spec = params.train, params.data.spec
    start = time.perf_counter()
    n = len(fit.train_split) // world * world  # equal shards: at most world-1 images wait
    order = torch.randperm(
        len(fit.train_split),
        generator=torch.Generator().manual_seed(params.seed * 100_003 + epoch),
    )[:n][fit.rank :: world]
    generator = torch.Generator().manual_seed(params.seed * 100_003 + epoch * 1_009 + fit.rank)
    steps = steps_per_epoch(len(fit.train_split), params, world)
    loss_sum = torch.zeros(params.model.n_exits, device=device)
    effective_sum = torch.zeros(params.model.n_exits, device=device)
    amp = device.type == "cuda" and config.amp
    boostnet = _unwrap(fit.net)
    fit.net.train()
    seen = 0
    for step in range(steps):
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        images = augment(fit.train_split.images[index], config, generator).to(device)
        targets = fit.train_split.targets[index].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = fit.net(normalise(images, spec.mean, spec.std))
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
        seen += len(index)
        if progress:
            rate = seen * world / (time.perf_counter() - start)
            progress.step(epoch, step + 1, steps, loss_sum / (step + 1), rate)
    train_stats = _all_reduce(torch.stack([loss_sum, effective_sum]) / steps) / world
    return {
        "train_loss": train_stats[0].tolist(),
        "effective_samples": train_stats[1].tolist(),
        "lr": fit.optimiser.param_groups[0]["lr"],
        "images_per_second": seen * world / (time.perf_counter() - start),
    }


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    params = Params.model_validate(config["params"])
    train_cfg = params.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(train_cfg.scaling.cpus_per_worker)))
    torch.manual_seed(params.seed)
    device = ray.train.torch.get_device()

    train_split = load_split(Path(config["prepared"]), "train")
    val_split = load_split(Path(config["prepared"]), "val")
    val_shard = val_split.subset(torch.arange(rank, len(val_split), world))

    net = BoostNet.from_params(params)
    if train_cfg.scaling.sync_bn and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    # MSDNet's last block may still compute finer scales that no head reads (as in the paper's
    # counting), so DDP must tolerate parameters without gradients.
    net = ray.train.torch.prepare_model(
        net, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    nodes = _node_ids(world)
    if rank == 0:
        Console().print(f"{world} worker(s) on Ray node(s) {' '.join(n[:8] for n in nodes)}")
    optimiser = make_optimizer(net, train_cfg)
    scheduler = make_scheduler(
        optimiser, train_cfg, steps_per_epoch(len(train_split), params, world)
    )

    fit = Fit(params, net, optimiser, scheduler, train_split, device, rank, world)
    start_epoch, history, best = 0, [], {"score": -1.0, "epoch": 0, "state": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / "state.pt")
            best_saved = load_checkpoint(Path(folder) / "best.pt")
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
        correct = _all_reduce(exit_correct(net, val_shard, params, device))
        val_top1 = (100.0 * correct.float() / len(val_split)).tolist()
        record = {
            "epoch": epoch + 1,
            **stats,
            "val_top1": val_top1,
            SELECTION_METRIC: sum(val_top1) / len(val_top1),
            "epoch_seconds": time.perf_counter() - epoch_start,
            "nodes": nodes,
        }
        history.append(record)
        if record[SELECTION_METRIC] >= best["score"]:
            best = {
                "score": record[SELECTION_METRIC],
                "epoch": epoch + 1,
                "state": {
                    k: v.detach().cpu().clone() for k, v in _unwrap(net).state_dict().items()
                },
            }
        if progress:
            progress.epoch(record)
        _report(fit, record, history, best)


def _device_name(net: torch.nn.Module) -> str:
    """The run's device tag: cpu, or cuda and the GPU's name."""
    device = next(net.parameters()).device
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _report(fit: Fit, record: dict, history: list, best: dict) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    metrics = {k: v for k, v in record.items() if not isinstance(v, list)}
    if fit.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        state = fit.state(record["epoch"], history=history, device=_device_name(fit.net))
        torch.save(state, Path(folder) / "state.pt")
        torch.save(
            {"model": best["state"], "epoch": best["epoch"], "score": best["score"]},
            Path(folder) / "best.pt",
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


@dataclass
class TrainOutcome:
    model_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]]
    device: str


def _use_gpu(params: Params) -> bool:
    setting = params.train.scaling.use_gpu
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def train(params: Params, prepared: Path, storage: Path, name: str) -> TrainOutcome:
    """Fit on Ray Train (Ray must be initialised) and return the selected weights."""
    scaling = params.train.scaling
    use_gpu = _use_gpu(params)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "params": params.model_dump(mode="json"),
            "prepared": str(prepared.resolve()),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker,
                **({"GPU": 1} if use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / "state.pt")
        best = load_checkpoint(Path(folder) / "best.pt")
    shutil.rmtree(storage / name, ignore_errors=True)  # stage outputs now hold what matters
    return TrainOutcome(best["model"], best["epoch"], state["history"], state["device"])


def ray_init_kwargs() -> dict[str, Any]:
    """Join the cluster in RAY_ADDRESS, else start a local one that listens on loopback only."""
    if os.environ.get("RAY_ADDRESS"):
        return {"address": os.environ["RAY_ADDRESS"]}
    # The Train controller polls its workers every 2 s by default; on short CPU runs that is
    # ~10 s of idle start-up and tear-down. Local clusters inherit this from the driver.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    return {
        "num_cpus": os.cpu_count(),
        # Train's placement-group cleaner asks the dashboard's state API about the controller;
        # without it every check logs a failure. It listens on 127.0.0.1 only.
        "include_dashboard": True,
        "configure_logging": False,
    }
