"""Ray Train plumbing shared by the train stage and Tune trials: a worker's start, its net
(DDP when there are several workers), its loader's placement, checkpoints reported and read
back, and the TorchTrainer that runs a loop on every worker."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from pipeline.boosting import BoostNet
from pipeline.config import Params
from pipeline.io import load_checkpoint
from pipeline.storage import Storage
from pipeline.verbosity import library_log_level, quiet_worker


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


def ddp_options(net: BoostNet, params: Params) -> dict[str, bool]:
    """DDP searches for parameters that got no gradient after every backward (a pass over the
    autograd graph) only when some exist, as when MSDNet's last block computes finer scales no
    head reads: found once, from one backward of a copy on a blank batch."""
    probe = copy.deepcopy(net).eval()  # eval: batch statistics of two blank images are moot
    sum(z.sum() for z in probe(torch.zeros(2, *params.input_shape))).backward()
    unused = any(p.grad is None for p in probe.parameters() if p.requires_grad)
    return {"find_unused_parameters": unused}


def node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (the history records where each epoch ran)."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def place_loader(loader: torch.utils.data.DataLoader) -> Iterable[Any]:
    """A worker's loader as Ray Train places it (batches on the worker's device); the sampler
    stays the caller's, which shards the files."""
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


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
    loop: Callable[[], None],
    *,
    workers: int,
    cpus: float,
    gpus: float,
    name: str,
    storage: Storage,
    **run_options: Any,
) -> TorchTrainer:
    """A Ray Train job of `workers` workers, each holding `cpus` CPUs and `gpus` GPUs, named
    `name` under `storage`, logging at our verbosity; `run_options` go to its RunConfig.
    `loop` runs on every worker: its inputs bound to it (functools.partial), typed."""
    return TorchTrainer(
        loop,
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
