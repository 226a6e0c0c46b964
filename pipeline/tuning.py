"""`boostpipe tune`: a Ray Tune search over BoostNet's temperatures and loss weights.

Each trial trains a BoostNet (Yu et al., AAAI 2023) whose t_n, w_n (and optionally lr and
gradient rescaling) were sampled from `tune.space`, on a subset of the prepared training split,
and scores it on the held-out split after every epoch, so ASHA can stop weak trials early. The
test split is never read. The default objective is `val_budget_auc` (see
`calibration.budget_auc`): the budgeted accuracy-vs-FLOPs curve reduced to one number.

Trials train in the trial's own process by default (a function trainable, one CPU each, so a
2-core machine runs two at once); `workers_per_trial > 1` makes every trial a Ray Train job
with that many DDP workers instead. The params.yaml values are always the first trial, so the
search reports how far it got above the defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from pipeline.boosting import BoostNet
from pipeline.calibration import budget_auc
from pipeline.cluster import require_resources
from pipeline.config import Params, TuneConfig, parse_with_overrides
from pipeline.data import AnySplit, split_from
from pipeline.devices import trial_device
from pipeline.evaluation import Source, collect_scores, exit_costs
from pipeline.fitting import make_fit, train_epoch, unwrap
from pipeline.io import read_json
from pipeline.outcome import Override, TrialSummary
from pipeline.raytrain import (
    place_loader,
    read_checkpoint,
    report_checkpoint,
    start_worker,
    torch_trainer,
    worker_net,
)
from pipeline.storage import Storage
from pipeline.verbosity import quiet_worker

MODE = "max"  # every objective is an accuracy


def _temperature_keys(config: TuneConfig, n_exits: int) -> list[str]:
    per = config.space.temperature.per if config.space.temperature else None
    if per == "shared":
        return ["t"]
    if per == "pair":
        return ["t_first", "t_last"]
    return [f"t_{k}" for k in range(1, n_exits + 1)] if per == "exit" else []


def search_space(config: TuneConfig, n_exits: int) -> dict[str, Any]:
    """Ray Tune distributions, flat names: t / t_first, t_last / t_k; w_k; lr; grad_rescale."""

    def sampler(low: float, high: float, log: bool) -> Any:
        return tune.loguniform(low, high) if log else tune.uniform(low, high)

    space: dict[str, Any] = {}
    rng = config.space.temperature
    for key in _temperature_keys(config, n_exits):
        space[key] = sampler(rng.low, rng.high, rng.log)
    if (rng := config.space.loss_weights) is not None:
        for k in range(1, n_exits + 1):
            space[f"w_{k}"] = sampler(rng.low, rng.high, rng.log)
    if (rng := config.space.lr) is not None:
        space["lr"] = sampler(rng.low, rng.high, rng.log)
    if config.space.grad_rescale:
        space["grad_rescale"] = tune.choice([True, False])
    return space


def overrides(sampled: dict[str, Any], n_exits: int) -> dict[str, Override]:
    """A trial's sampled values as dotted params keys (what `dvc exp run -S` takes)."""
    out: dict[str, Override] = {}
    exits = range(1, n_exits + 1)
    for keys in (["t"], ["t_first", "t_last"], [f"t_{k}" for k in exits]):
        if all(key in sampled for key in keys):
            out["boost.temperature"] = [float(sampled[key]) for key in keys]
            break
    if "w_1" in sampled:
        out["boost.loss_weights"] = [float(sampled[f"w_{k}"]) for k in exits]
    if "lr" in sampled:
        out["train.lr"] = float(sampled["lr"])
    if "grad_rescale" in sampled:
        out["boost.grad_rescale"] = bool(sampled["grad_rescale"])
    return out


def apply_overrides(params: Params, dotted: dict[str, Any]) -> Params:
    return parse_with_overrides(params.model_dump(mode="json"), dotted, "tune trial")


def default_point(params: Params, space: dict[str, Any]) -> dict[str, Any]:
    """The params.yaml values in the search's terms (clipped into its ranges): trial 0."""
    n = params.model.n_exits
    temps, weights = params.boost.temperatures(n), params.boost.weights(n)
    values = {"t": temps[0], "t_first": temps[0], "t_last": temps[-1], "lr": params.train.lr}
    values |= {f"t_{k + 1}": t for k, t in enumerate(temps)}
    values |= {f"w_{k + 1}": w for k, w in enumerate(weights)}
    values["grad_rescale"] = params.boost.grad_rescale
    point = {}
    for key, domain in space.items():
        value = values[key]
        if hasattr(domain, "lower"):
            value = min(max(value, domain.lower), domain.upper)
        point[key] = value
    return point


def search_name(params: Params, fingerprint: str) -> str:
    """Same params, search settings and data -> same name, so `--resume` finds the search."""
    shaping = params.model_dump(mode="json", exclude={"tracking", "calibrate", "evaluate", "ray"})
    for key in ("max_concurrent", "cpus_per_trial", "gpus_per_trial"):
        shaping["tune"].pop(key)
    blob = json.dumps([shaping, fingerprint], sort_keys=True).encode()
    return "tune-" + hashlib.sha256(blob).hexdigest()[:12]


# --- inside a trial -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialInputs:
    """What every trial takes from the driver, reachable from any node: the prepared splits
    (in Ray's object store) and where a trial's own Ray Train job keeps its checkpoints."""

    arrays: ray.ObjectRef  # the prepared arrays
    storage: Storage


def _trial_data(params: Params, inputs: TrialInputs) -> tuple[AnySplit, AnySplit]:
    config = params.tune
    arrays = ray.get(inputs.arrays)
    train, val = split_from(arrays, "train"), split_from(arrays, "val")
    if config.train_subset and config.train_subset < len(train):
        train = train.subset(torch.arange(config.train_subset))
    if config.val_subset and config.val_subset < len(val):
        val = val.subset(torch.arange(config.val_subset))
    return train, val


def _score(
    net: torch.nn.Module, val: AnySplit, params: Params, exit_flops: list[int]
) -> dict[str, float]:
    """The held-out metrics a trial reports after every epoch."""
    source = Source(val, params.data, params.train.eval_batch_size)
    scores, _ = collect_scores(net, source, next(net.parameters()).device)
    top1 = scores.top1()
    return {
        "val_budget_auc": budget_auc(scores, exit_flops),
        "val_mean_top1": sum(top1) / len(top1),
        "val_final_top1": top1[-1],
        **{f"val_top1_exit_{k}": v for k, v in enumerate(top1, start=1)},
    }


def _trial_loop(
    params: Params,
    inputs: TrialInputs,
    report: Callable,
    rank: int,
    world: int,
    device: torch.device,
) -> None:
    """Train and score one configuration epoch by epoch, resuming from the trial's checkpoint.
    In-process trials report to Tune directly; Ray Train workers report through Train."""
    torch.manual_seed(params.seed)
    train, val = _trial_data(params, inputs)
    net = BoostNet.from_params(params)
    exit_flops = exit_costs(net, params)
    net = worker_net(net, params, device, ray_train=world > 1)
    fit = make_fit(
        params, net, train, device, rank, world, params.tune.epochs, place_loader=place_loader
    )
    start = 0
    checkpoint = tune.get_checkpoint() if world == 1 else None
    if checkpoint is not None:
        (state,) = read_checkpoint(checkpoint, "state.pt")
        start = fit.restore(state)
    for epoch in range(start, params.tune.epochs):
        began = time.perf_counter()
        stats = train_epoch(fit, epoch)
        trained = time.perf_counter()
        metrics = {"epoch": epoch + 1, "train_seconds": trained - began}
        metrics |= {f"train_loss_exit_{k}": v for k, v in enumerate(stats.train_loss, 1)}
        if rank == 0:
            metrics |= _score(unwrap(net), val, params, exit_flops)
        metrics["score_seconds"] = time.perf_counter() - trained
        if world > 1:
            report(metrics)
            continue
        report_checkpoint(report, tune.Checkpoint, metrics, {"state.pt": fit.state(epoch + 1)})


def _trial_params(sampled: dict[str, Any], base: dict[str, Any]) -> Params:
    params = Params.model_validate(base)
    return apply_overrides(params, overrides(sampled, params.model.n_exits))


def run_trial(sampled: dict[str, Any], base: dict[str, Any], prepared: TrialInputs) -> None:
    """The function trainable: one configuration, trained in this process on the GPU that
    gpus_per_trial reserved for it, if any."""
    quiet_worker()
    params = _trial_params(sampled, base)
    torch.set_num_threads(max(1, int(params.tune.cpus_per_trial)))
    device = trial_device(ray.get_gpu_ids())
    _trial_loop(params, prepared, tune.report, rank=0, world=1, device=device)


def _trial_worker(params: Params, inputs: TrialInputs) -> None:
    """One Ray Train worker of a trial that is a DDP job."""
    rank, world, device = start_worker(params.tune.cpus_per_trial)
    _trial_loop(params, inputs, ray.train.report, rank, world, device)


def run_trial_on_ray_train(
    sampled: dict[str, Any], base: dict[str, Any], prepared: TrialInputs
) -> None:
    """The trainable when `workers_per_trial > 1`: the trial is a Ray Train job (DDP), and
    rank 0's metrics reach Tune through Train's TuneReportCallback."""
    params = _trial_params(sampled, base)
    config = params.tune
    torch_trainer(
        partial(_trial_worker, params, prepared),
        workers=config.workers_per_trial,
        cpus=config.cpus_per_trial,
        gpus=config.gpus_per_trial,
        name=tune.get_context().get_trial_id(),
        storage=prepared.storage,
        callbacks=[TuneReportCallback()],
    ).fit()


# --- the driver ----------------------------------------------------------------------------


@dataclass
class SearchSetup:
    params: Params
    inputs: TrialInputs
    storage: Path  # this machine's record of the search: lock, MLflow marker, params, log
    ray_storage: Storage  # Ray Tune's experiment folders (pipeline/storage.py)
    name: str
    callbacks: list[Any]


def default_trainable(config: TuneConfig) -> Callable:
    return run_trial if config.workers_per_trial == 1 else run_trial_on_ray_train


def bound_trainable(setup: SearchSetup, trainable: Callable, **extra: Any) -> Any:
    """`trainable(config, base=, prepared=, **extra)` with each trial's resources; `prepared`
    is the search's TrialInputs."""
    config = setup.params.tune
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    if config.workers_per_trial > 1:  # the Train workers hold the resources; the trial waits
        resources = {"cpu": 0.01}
    base = setup.params.model_dump(mode="json")
    return tune.with_resources(
        tune.with_parameters(trainable, base=base, prepared=setup.inputs, **extra),
        resources,
    )


def run_config(setup: SearchSetup) -> Any:
    """Where Tune keeps the run's state (for `--resume`) and what it logs besides our callbacks."""
    return tune.RunConfig(
        name=setup.name,
        storage_path=setup.ray_storage.path,
        storage_filesystem=setup.ray_storage.filesystem,
        callbacks=[*setup.callbacks, JsonLoggerCallback()],
        verbose=1,  # its progress report: to the search's log file unless verbose (chatter_to)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )


def make_tuner(setup: SearchSetup, resume: bool, trainable: Callable | None = None) -> Any:
    """A new Tuner, or the interrupted one restored from its folder (finished trials kept)."""
    params, config = setup.params, setup.params.tune
    n_exits = params.model.n_exits
    bound = bound_trainable(setup, trainable or default_trainable(config))
    if resume:
        return restored(setup, bound)
    space = search_space(config, n_exits)
    first = [default_point(params, space)]
    if config.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # The searcher itself holds trials back: Tune ignores `max_concurrent_trials` (with a
        # warning) once a search algorithm is wrapped, so the limit lives here.
        searcher = ConcurrencyLimiter(
            OptunaSearch(points_to_evaluate=first, seed=config.seed), config.max_concurrent
        )
    else:
        searcher = BasicVariantGenerator(
            points_to_evaluate=first,
            random_state=config.seed,
            max_concurrent=config.max_concurrent,
        )
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=config.epochs,
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor,
        )
        if config.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        bound,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=MODE,
            num_samples=config.trials,
            search_alg=searcher,
            scheduler=scheduler,
            reuse_actors=True,
        ),
        run_config=run_config(setup),
    )


def restored(setup: SearchSetup, bound: Any) -> Any:
    """The interrupted Tuner of `setup`, from its folder in the Ray storage (finished trials
    kept, errored ones not rerun)."""
    folder = setup.ray_storage.join(setup.name)
    filesystem = setup.ray_storage.filesystem
    return tune.Tuner.restore(folder, bound, resume_errored=False, storage_filesystem=filesystem)


def quiet_ray_tune() -> None:
    """Our callbacks draw the table and log to MLflow; of Tune's own per-trial loggers only the
    JSON one stays (its result.json is what a restored search reads back), no CSV or
    TensorBoard (they cost time and warn without tensorboardX)."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def summarise(results: Any, params: Params, space: dict[str, Any]) -> list[TrialSummary]:
    """Every trial of a Ray Tune ResultGrid, ranked by its last reported objective."""
    config, n_exits = params.tune, params.model.n_exits
    trials = []
    for result in results:
        metrics = result.metrics or {}
        epochs = int(metrics.get("training_iteration", 0))
        outcome = "failed" if result.error else "finished"
        if outcome == "finished" and epochs < config.epochs:
            outcome = "stopped_early"
        sampled = {k: v for k, v in (result.config or {}).items() if k in space}
        trials.append(
            TrialSummary(
                trial_id=metrics.get("trial_id") or Path(result.path).name,
                outcome=outcome,
                epochs=epochs,
                score=None if result.error else metrics.get(config.metric),
                sampled=sampled,
                overrides=overrides(sampled, n_exits),
                val_top1_by_exit=[metrics.get(f"val_top1_exit_{k}") for k in range(1, n_exits + 1)],
            )
        )
    # Finished trials rank above stopped ones: a score after fewer epochs is not comparable.
    trials.sort(key=lambda t: (t.score is None, t.outcome != "finished", -(t.score or 0.0)))
    return trials


def check_ended(runs: Any, results: Any, expected: int, what: str) -> None:
    """Raise SearchInterrupted unless all `expected` trials of the phase have ended, by their
    child runs (`runs`: the phase's MlflowTrials), or by Tune's record if the store failed."""
    ended = runs.ended()
    if ended is None:
        ended = sum(1 for r in results if r.error or (r.metrics or {}).get("done"))
    if ended < expected:
        raise SearchInterrupted(
            f"interrupted after {ended} of {expected} {what}; "
            "`boostpipe tune --resume` continues the search"
        )


def confirm_name(name: str) -> str:
    """The confirmation's Tune folder, beside the search's."""
    return f"{name}-confirm"


def saved_params(storage: Path, name: str) -> Path:
    return storage / f"{name}.params.json"


def resumable(params: Params, fingerprint: str, storage: Path, ray_storage: Storage) -> Params:
    """What `--resume` continues: the search these params name if it is unfinished, else the
    most recently started unfinished one (with the params it was started with); a finished
    search is reported only when nothing else is left to resume. A search
    is unfinished while its MLflow marker file exists (removed when its summary is logged);
    it started once Tune saved its state in `ray_storage`."""
    name = search_name(params, fingerprint)
    named_started = ray_storage.exists(f"{name}/tuner.pkl")
    if named_started and (storage / f"{name}.mlflow-run").exists():
        return params
    waiting = sorted(
        (
            marker
            for marker in storage.glob("tune-*.mlflow-run")
            if ray_storage.exists(f"{marker.stem}/tuner.pkl")
            and saved_params(storage, marker.stem).exists()
        ),
        key=lambda marker: marker.stat().st_mtime,
    )
    if not waiting and named_started:
        raise SearchFinished(
            f"search {name} has finished: nothing to resume (`boostpipe tune` without --resume "
            "runs it again)"
        )
    if not waiting:
        raise SearchNotFound(f"--resume: no interrupted search under {storage}")
    latest = waiting[-1].stem
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(waiting[-1].stat().st_mtime))
    others = [marker.stem for marker in waiting[:-1]]
    print(
        (f"search {name} has finished; " if named_started else "")
        + f"resuming {latest}, the latest interrupted search (started {started})"
        + (f"; also interrupted: {', '.join(others)}" if others else ""),
        file=sys.stderr,
    )
    return Params.model_validate(read_json(saved_params(storage, latest)))


def check_fits(config: TuneConfig, cluster: dict[str, float]) -> None:
    """A trial that asks for more than the whole cluster has would wait forever: say so."""
    workers = config.workers_per_trial
    extra = 0.01 if workers > 1 else 0.0  # the trial's own process beside its Train workers
    for kind, per_worker in (("CPU", config.cpus_per_trial), ("GPU", config.gpus_per_trial)):
        require_resources(
            "a trial",
            f"tune.{kind.lower()}s_per_trial",
            workers,
            per_worker,
            kind,
            cluster.get(kind, 0.0),
            extra if kind == "CPU" else 0.0,
        )


def same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if isinstance(b[k], bool) else abs(a[k] - b[k]) < 1e-9 for k in b
    )


class SearchFinished(RuntimeError):
    """`--resume` on a search that already ended; nothing is changed."""


class SearchNotFound(FileNotFoundError):
    """`--resume` without an interrupted search; the message is one line."""


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before every trial ended (Ctrl-C, or SIGTERM in a stage); its state
    and MLflow run wait for `--resume`."""
