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

import hashlib
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import ray
import ray.train
import torch
from rich.console import Console

from pipeline.boosting import BoostNet
from pipeline.cluster import worker_layout
from pipeline.config import ConfigError, Params
from pipeline.data import FileSplit, split_from
from pipeline.devices import describe_platform
from pipeline.epochs import EpochRecord
from pipeline.fitting import (
    Fit,
    all_reduce,
    exit_correct,
    keeps,
    make_fit,
    selection_score,
    train_epoch,
    unwrap,
)
from pipeline.folders import DatasetError
from pipeline.inputs import BadImage, default_loader_workers
from pipeline.interrupts import sigint_handler_restored
from pipeline.io import CorruptFile, load_arrays
from pipeline.progress import Progress
from pipeline.raytrain import (
    node_ids,
    place_loader,
    read_checkpoint,
    report_checkpoint,
    start_worker,
    torch_trainer,
    worker_net,
)
from pipeline.storage import REACH_STORAGE, Storage, check_nodes_reach


def run_name(params: Params, data_fingerprint: str) -> str:
    """Same params and data -> same name, so an interrupted run is found and resumed."""
    shaping = params.model_dump(mode="json", include={"seed", "data", "model", "boost", "train"})
    del shaping["train"]["compile"]  # how the step runs, not what it learns: resumable either way
    blob = json.dumps([shaping, data_fingerprint], sort_keys=True).encode()
    return "train-" + hashlib.sha256(blob).hexdigest()[:12]


class EpochLog(Protocol):
    """Where rank 0 sends each epoch as it ends (e.g. `tracking.EpochLogger`); pickled to the
    worker, so the training code never imports the tracking library."""

    def __call__(self, record: EpochRecord) -> None: ...

    def must_reach(self) -> dict[str, str]:
        """Paths every node must reach for it, each with the advice when one cannot."""
        ...


@dataclass(frozen=True)
class WorkerInputs:
    """What every Ray Train worker takes from the driver, reachable from any node: the
    prepared splits (in Ray's object store), a folder dataset's files, where a deterministic
    error is written down for the driver, and where rank 0 logs each epoch."""

    params: Params
    prepared: ray.ObjectRef
    root: Path | None  # folder datasets: data.root, resolved by the driver
    storage: Storage
    error_marker: str
    log_epoch: EpochLog | None


@dataclass
class Kept:
    """The weights `train.select` keeps so far, with their epoch and score."""

    score: float
    epoch: int
    state: dict[str, torch.Tensor] | None


# Errors that recur on every restart (same data, same code, same file): Ray's FailureConfig
# should restart only after a lost worker or node, never to meet these again.
DETERMINISTIC: tuple[type[Exception], ...] = (BadImage, DatasetError, CorruptFile, ConfigError)


def _worker_loop(inputs: WorkerInputs) -> None:
    """Runs in every Ray Train worker. A deterministic error (an unreadable image or file, a
    bad setting) is written down for the driver, and Ray's restarts after it (FailureConfig)
    stop at once instead of failing the same way again. (The note goes to the run's storage,
    which the driver reads whichever node the worker ran on.)"""
    storage, marker = inputs.storage, inputs.error_marker
    if storage.exists(marker):
        _raise_recorded(storage, marker)
    try:
        _fit_worker(inputs)
    except DETERMINISTIC as exc:
        storage.write_text(marker, json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise


def _raise_recorded(storage: Storage, marker: str) -> None:
    """The deterministic error a worker wrote down, as its own type: one line, no traceback."""
    recorded = json.loads(storage.read_text(marker))
    kind = next(cls for cls in DETERMINISTIC if cls.__name__ == recorded["type"])
    raise kind(recorded["message"])


def _fit_worker(inputs: WorkerInputs) -> None:
    params = inputs.params
    train_cfg = params.train
    rank, world, device = start_worker(train_cfg.scaling.cpus_per_worker)
    torch.manual_seed(params.seed)

    arrays = ray.get(inputs.prepared)  # from the object store: no worker reads our disk
    train_split, val_split = split_from(arrays, "train"), split_from(arrays, "val")
    del arrays
    val_shard = val_split.subset(torch.arange(len(val_split))[rank::world])  # may be empty
    root = inputs.root
    loaders = default_loader_workers(train_cfg.scaling.cpus_per_worker, train_cfg.loader_workers)

    net = worker_net(BoostNet.from_params(params), params, device)
    nodes = node_ids(world)
    if rank == 0:
        Console().print(f"{world} worker(s) on Ray node(s) {' '.join(n[:8] for n in nodes)}")
    fit = make_fit(
        params, net, train_split, device, rank, world, train_cfg.epochs, root, loaders, place_loader
    )
    start_epoch, history, best = 0, [], Kept(-1.0, 0, None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, best_saved = read_checkpoint(checkpoint, "state.pt", "best.pt")
        start_epoch = fit.restore(state)
        history = [EpochRecord.from_json(row) for row in state["history"]]
        best = Kept(best_saved["score"], best_saved["epoch"], best_saved["model"])
        if rank == 0:
            Console().print(f"[yellow]resuming after epoch {start_epoch}[/]")

    progress = Progress(train_cfg.epochs, start_epoch) if rank == 0 else None
    for epoch in range(start_epoch, train_cfg.epochs):
        epoch_start = time.perf_counter()
        stats = train_epoch(fit, epoch, progress)
        val_top1 = []  # data.val_size 0: nothing held out to score
        if len(val_split):
            correct = all_reduce(exit_correct(net, val_shard, params, device, root, loaders))
            if isinstance(val_split, FileSplit):  # the last entry counts unreadable files skipped
                stats.skipped_images = (stats.skipped_images or 0) + int(correct[-1])
                correct = correct[:-1]
            val_top1 = (100.0 * correct.float() / len(val_split)).tolist()
        record = EpochRecord(epoch + 1, stats, val_top1, time.perf_counter() - epoch_start, nodes)
        history.append(record)
        score = selection_score(train_cfg, val_top1)
        if keeps(train_cfg, score, best.score):
            state = {k: v.detach().cpu().clone() for k, v in unwrap(net).state_dict().items()}
            best = Kept(score, epoch + 1, state)
        if progress:
            progress.epoch(record)
        _report(fit, record, history, best, inputs.log_epoch)


def _report(
    fit: Fit, record: EpochRecord, history: list[EpochRecord], best: Kept, log: EpochLog | None
) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint, then hands the
    epoch to `log`, if any."""
    metrics = record.metrics()
    if fit.rank != 0:
        ray.train.report(metrics)
        return
    state = fit.state(
        record.epoch,
        history=[r.as_json() for r in history],
        platform=describe_platform(next(fit.net.parameters()).device),
    )
    kept = {"model": best.state, "epoch": best.epoch, "score": best.score}
    report_checkpoint(
        ray.train.report, ray.train.Checkpoint, metrics, {"state.pt": state, "best.pt": kept}
    )
    if log:
        log(record)


@dataclass
class TrainOutcome:
    """What the train stage writes: the kept weights, their epoch, every epoch's record and
    where they were trained (`devices.describe_platform`)."""

    model_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[EpochRecord]
    platform: dict[str, str]

    @property
    def device(self) -> str:
        return self.platform["device"]


def train(
    params: Params,
    prepared: Path,
    storage: Storage,
    name: str,
    root: Path | None = None,
    log_epoch: EpochLog | None = None,
) -> TrainOutcome:
    """Fit on Ray Train (Ray must be initialised) and return the selected weights. The
    prepared splits reach the workers through Ray's object store; checkpoints go to `storage`
    (see pipeline/storage.py). `root`: where a folder dataset's files are (the manifest is
    relative to it), which every node must read; `log_epoch`: where rank 0 sends each epoch's
    record as it ends (e.g. the MLflow run)."""
    layout = worker_layout(params, ray.cluster_resources())
    needs = {"CPU": params.train.scaling.cpus_per_worker, "GPU": 1 if layout.use_gpu else 0}
    reach = {str(root.resolve()): REACH_STORAGE} if root else {}
    if log_epoch:  # rank 0 logs each epoch
        reach |= log_epoch.must_reach()
    check_nodes_reach(storage, needs, reach)
    # A damaged file fails here in one line, not in every worker.
    arrays = ray.put(load_arrays(prepared))
    error_marker = f"{name}.error"
    storage.delete(error_marker)
    inputs = WorkerInputs(
        params, arrays, root.resolve() if root else None, storage, error_marker, log_epoch
    )
    trainer = torch_trainer(
        partial(_worker_loop, inputs),
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
    history = [EpochRecord.from_json(row) for row in state["history"]]
    platform = state.get("platform") or {"device": state["device"]}  # a checkpoint of before
    return TrainOutcome(best["model"], best["epoch"], history, platform)
