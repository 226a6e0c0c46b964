"""A search's winner, confirmed: the best `tune.confirm.top_k` configurations and the params
file's own values are retrained with `tune.confirm.seeds` fresh seeds each, on the trials'
budget, and ranked by their mean objective. The best of many one-seed trials is biased upward
(the winner's curse); a mean over fresh seeds is not, and pairing each seed with the params
file's run on the same seed gives the gain a 95 % t interval. `boostpipe tune --apply` writes
the confirmed best only when that interval lies above zero.

The runs go through Ray Tune like the search's trials (a second, small Tuner over the
(configuration, seed) pairs, the same trainable), so concurrency, GPU placement and `--resume`
behave the same; they are MLflow child runs of the search's parent tagged `boostpipe.phase=confirm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import Params, write_overrides
from pipeline.interrupts import sigint_handler_restored
from pipeline.io import write_json
from pipeline.outcome import PARAMS_FILE, Candidate, Confirmation, SearchOutcome
from pipeline.tune_callbacks import trial_callbacks
from pipeline.tuning import (
    MODE,
    SearchSetup,
    bound_trainable,
    check_ended,
    confirm_name,
    default_point,
    default_trainable,
    overrides,
    restored,
    run_config,
    search_space,
)


def candidates(outcome: SearchOutcome, params: Params, top_k: int) -> list[Candidate]:
    """The best `top_k` finished trials other than the params file's values, and those values."""
    space = search_space(params.tune, params.model.n_exits)
    default_id = outcome.default.trial_id if outcome.default else None
    top = [
        t
        for t in outcome.trials
        if t.outcome == "finished" and t.score is not None and t.trial_id != default_id
    ][:top_k]
    point = default_point(params, space)
    return [
        *(Candidate(t.trial_id, t.sampled, t.overrides, t.score) for t in top),
        Candidate(
            PARAMS_FILE,
            point,
            overrides(point, params.model.n_exits),
            outcome.default.score if outcome.default else None,
        ),
    ]


def fresh_seeds(params: Params) -> list[int]:
    """Seeds no search trial used (every trial trains with `seed`)."""
    return [params.seed + 1 + k for k in range(params.tune.confirm.seeds)]


def confirm_trial(
    config: dict[str, Any], base: dict[str, Any], prepared: Any, inner: Callable
) -> None:
    """The search's trainable (`inner`) on one (configuration, seed) pair."""
    sampled = {k: v for k, v in config.items() if k not in ("candidate", "seed")}
    inner(sampled, {**base, "seed": config["seed"]}, prepared)


def confirm(
    search: SearchSetup, outcome: SearchOutcome, resume: bool, trainable: Callable | None
) -> Confirmation | None:
    """Run (or, with `resume`, continue) the confirmation of a finished search, inside its Ray
    session; raises SearchInterrupted when it stopped before every run ended. None when no
    trial but the params file's values finished: nothing to confirm."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    params = search.params
    config = params.tune
    chosen = candidates(outcome, params, config.confirm.top_k)
    if len(chosen) == 1:
        return None
    seeds = fresh_seeds(params)
    points = [{"candidate": c.label, "seed": s, **c.sampled} for c in chosen for s in seeds]
    callbacks = trial_callbacks(params, outcome.parent_run_id, "confirm", "confirmation")
    setup = dataclasses.replace(search, name=confirm_name(search.name), callbacks=callbacks)
    bound = bound_trainable(setup, confirm_trial, inner=trainable or default_trainable(config))
    if resume and setup.ray_storage.exists(f"{setup.name}/tuner.pkl"):
        tuner = restored(setup, bound)
    else:
        space = search_space(config, params.model.n_exits)
        space |= {"candidate": tune.choice([c.label for c in chosen]), "seed": tune.choice(seeds)}
        tuner = tune.Tuner(
            bound,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=config.metric,
                mode=MODE,
                num_samples=len(points),
                search_alg=BasicVariantGenerator(
                    points_to_evaluate=points, max_concurrent=config.max_concurrent
                ),
                scheduler=FIFOScheduler(),  # every run gets the whole budget
                reuse_actors=True,
            ),
            run_config=run_config(setup),
        )
    with sigint_handler_restored():
        results = tuner.fit()
    check_ended(callbacks[0], results, len(points), "confirmation runs")
    by_label = {c.label: c for c in chosen}
    for result in results:
        metrics = result.metrics or {}
        if result.error or metrics.get("training_iteration", 0) < config.epochs:
            continue
        by_label[result.config["candidate"]].scores[result.config["seed"]] = metrics[config.metric]
    chosen.sort(key=lambda c: (c.mean is None, -(c.mean or 0.0)))
    return Confirmation(seeds, chosen)


def log_confirmation(run_id: str, confirmation: Confirmation, metric: str, folder: Path) -> None:
    """The confirmed figures on the search's parent run: means and stds per configuration,
    the gain with its interval (metrics), the confirmed best (tag) and confirmation.json."""
    from mlflow import MlflowClient

    figures = confirmation.figures(metric)
    client = MlflowClient()
    client.set_tag(run_id, "tune.confirmed_best", figures.pop("confirmed_best"))
    client.set_tag(run_id, "tune.challenger", figures.pop("challenger"))
    tracking.log_metrics(run_id, [(key, value, 0) for key, value in figures.items()])
    path = folder / "confirmation.json"
    ranked = [{**vars(c), "mean": c.mean, "std": c.std} for c in confirmation.candidates]
    write_json(path, {"seeds": confirmation.seeds, "candidates": ranked})
    tracking.log_artifacts(run_id, [path])


def apply_confirmed(params_path: Path, outcome: SearchOutcome, force: bool) -> str:
    """`boostpipe tune --apply`: the confirmed best goes into the params file only when its
    gain's interval lies above zero (or `force`); otherwise the file is not touched. Returns
    the line that says which."""
    confirmation, chosen = outcome.confirmation, outcome.chosen
    if not chosen:
        return f"--apply: the params file's values are the best; {params_path} left unchanged"
    if not force and confirmation is None:
        return (
            f"--apply: no confirmation (tune.confirm.top_k 0), so no interval; {params_path} "
            "left unchanged (--apply --force writes the best trial's values)"
        )
    if not force and not confirmation.significant:
        return (
            "--apply: the confirmed gain's 95% interval does not lie above zero; "
            f"{params_path} left unchanged (--apply --force writes it anyway)"
        )
    write_overrides(params_path, chosen)
    return f"wrote the {'confirmed ' if confirmation else ''}best values into {params_path}"
