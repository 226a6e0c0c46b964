"""The search as a command runs it: one process owns a search's folder, a parent MLflow run
holds a child per trial, Ray Tune runs the trials (pipeline/tuning.py), then the confirmation
of the best over fresh seeds (pipeline/confirmation.py), and the summary. Apart from
tuning.py so that both it and confirmation.py stay below this driver (no import cycle)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from pipeline import plots, tracking
from pipeline.boosting import BoostNet
from pipeline.cluster import ray_session
from pipeline.config import ConfigError, Params
from pipeline.confirmation import confirm, log_confirmation
from pipeline.evaluation import exit_costs
from pipeline.interrupts import sigint_handler_restored
from pipeline.io import load_arrays, write_json
from pipeline.locks import exclusive
from pipeline.outcome import SearchOutcome
from pipeline.storage import REACH_STORAGE, Storage, check_nodes_reach, open_storage
from pipeline.tune_callbacks import trial_callbacks
from pipeline.tuning import (
    SearchNotFound,
    SearchSetup,
    TrialInputs,
    check_ended,
    check_fits,
    confirm_name,
    default_point,
    make_tuner,
    quiet_ray_tune,
    resumable,
    same_point,
    saved_params,
    search_name,
    search_space,
    summarise,
)
from pipeline.verbosity import chatter_to, verbose


def run_search(
    params: Params,
    prepared: Path,
    dataset: dict[str, Any],
    storage: Path,
    resume: bool = False,
    trainable: Callable | None = None,
) -> SearchOutcome:
    """Run (or resume) the search with MLflow tracking: a parent run for the search, a child
    per trial, and the summary on the parent. Ray must not be initialised yet. One process at
    a time owns a search's folder: a second one raises `locks.Busy` before touching it."""
    ray_storage = open_storage(params.ray, storage)  # Tune's state; checked before any work
    if resume:
        params = resumable(params, dataset["fingerprint"], storage, ray_storage)
    name = search_name(params, dataset["fingerprint"])
    with exclusive(storage / f"{name}.lock", f"search {name}"):
        return _search(params, prepared, dataset, storage, ray_storage, name, resume, trainable)


def _search(
    params: Params,
    prepared: Path,
    dataset: dict[str, Any],
    storage: Path,
    ray_storage: Storage,
    name: str,
    resume: bool,
    trainable: Callable | None,
) -> SearchOutcome:
    if params.data.val_size == 0:
        raise ConfigError("data.val_size: is 0, but tune scores trials on the held-out split")
    arrays = load_arrays(prepared)  # a damaged file fails here in one line, not in every trial
    marker = storage / f"{name}.mlflow-run"
    if resume and not ray_storage.exists(f"{name}/tuner.pkl"):
        raise SearchNotFound(f"--resume: no interrupted search {name} under {ray_storage.uri}")
    if not resume:  # a new search: forget an earlier one with the same settings
        for folder in (name, confirm_name(name)):
            shutil.rmtree(storage / folder, ignore_errors=True)
            ray_storage.delete(folder)
        marker.unlink(missing_ok=True)
        write_json(saved_params(storage, name), params.model_dump(mode="json"))
    parent = tracking.start_run(params, dataset["fingerprint"], dataset["source"], marker, name)
    with tracking.status_of(parent, finish=True):  # KILLED on Ctrl-C, open for --resume
        outcome = _fit(params, arrays, storage, ray_storage, name, parent, resume, trainable)
    marker.unlink(missing_ok=True)
    return outcome


def _fit(
    params: Params,
    arrays: dict[str, Any],
    storage: Path,
    ray_storage: Storage,
    name: str,
    parent: str,
    resume: bool,
    trainable: Callable | None,
) -> SearchOutcome:
    """The search itself, with its trials logged under `parent`, its confirmation, and the
    summary. Ray's own chatter goes to the search's log file (its path printed first)."""
    config = params.tune
    log = storage / name / "tune.log"
    if not verbose():
        print(f"Ray Tune's log: {log} (`boostpipe -v tune` shows it here)", file=sys.stderr)
    quiet_ray_tune()
    with chatter_to(log), ray_session():
        check_fits(config, ray.cluster_resources())
        reach = {}  # trials log through Tune's callbacks, in this process: no MLflow store
        if params.data.is_folder:
            reach[str(Path(params.data.root).resolve())] = REACH_STORAGE
        needs = {"CPU": config.cpus_per_trial, "GPU": config.gpus_per_trial}
        check_nodes_reach(ray_storage, needs, reach)
        # Trials on any node read the splits from Ray's object store, not from this disk.
        inputs = TrialInputs(ray.put(arrays), ray_storage.child("tune-train"))
        callbacks = trial_callbacks(params, parent, "search", "boostpipe tune")
        setup = SearchSetup(params, inputs, storage, ray_storage, name, callbacks)
        with sigint_handler_restored():  # Tune's handler would swallow a later SIGTERM
            results = make_tuner(setup, resume, trainable).fit()
        # After Ctrl-C Tune saves its state and returns as if done; the child runs say which
        # trials really ended (finished, stopped by the scheduler, or failed), resumes included.
        check_ended(callbacks[0], results, config.trials, "trials")
        space = search_space(config, params.model.n_exits)
        trials = summarise(results, params, space)
        first = default_point(params, space)
        default = next((t for t in trials if same_point(t.sampled, first)), None)
        outcome = SearchOutcome(name, parent, config.metric, trials, default)
        if config.confirm.top_k and outcome.best is not None:
            outcome.confirmation = confirm(setup, outcome, resume, trainable)
    tracking.best_effort(
        lambda: log_search(parent, outcome, params, storage / f"{name}-summary"),
        "the search's summary",
    )
    return outcome


def log_search(run_id: str, outcome: SearchOutcome, params: Params, folder: Path) -> None:
    """The search's summary on its parent run: the best and default objectives, how trials
    ended, the best trial's per-exit curve (step = exit) and values, and two plots."""
    from mlflow import MlflowClient

    client = MlflowClient()
    metric, best = outcome.metric, outcome.best
    values: list[tuple[str, float, int]] = [
        (f"trials_{kind}", outcome.count(kind), 0)
        for kind in ("finished", "stopped_early", "failed")
    ]
    if outcome.default is not None and outcome.default.score is not None:
        values.append((f"default_{metric}", outcome.default.score, 0))
    files = []
    if best is not None:
        values.append((f"best_{metric}", best.score, 0))
        values += [("best_val_top1_by_exit", v, k) for k, v in enumerate(best.val_top1_by_exit, 1)]
        mflops = [f / 1e6 for f in exit_costs(BoostNet.from_params(params), params)]
        plots.exit_curve(
            folder / "best_trial_exits.png",
            mflops,
            best.val_top1_by_exit,
            f"best trial {best.trial_id}: {metric} {best.score:.2f}",
        )
        write_json(folder / "best_params.json", outcome.chosen)
        files += [folder / "best_trial_exits.png", folder / "best_params.json"]
    plots.search_summary(folder / "search_summary.png", outcome.trials, metric)
    write_json(folder / "trials.json", [vars(trial) for trial in outcome.trials])
    files += [folder / "search_summary.png", folder / "trials.json"]
    if best is not None:
        client.set_tag(run_id, "tune.best_trial", best.trial_id)
    tracking.log_metrics(run_id, values)
    tracking.log_artifacts(run_id, files)
    if outcome.confirmation is not None:
        log_confirmation(run_id, outcome.confirmation, metric, folder)
