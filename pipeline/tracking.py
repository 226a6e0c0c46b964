"""MLflow tracking: one run per trained model, filled in by train, calibrate and evaluate.

The default store is a SQLite database and an artifact folder in the project root, with absolute
paths so that runs made by `dvc exp run --temp/--queue` (in copies under .dvc/tmp/exps) land in the
same store. MLFLOW_TRACKING_URI, or `tracking.uri` in params, selects another store, e.g. an
`mlflow server` on loopback. The store is checked before training starts, and logging after
training retries transient failures and never costs the stage its outputs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.config import Params

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the message is one line naming it."""


def project_root(cwd: Path | None = None) -> Path:
    """The repository root, also from inside DVC's temporary experiment copies."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return cwd


def tracking_uri(params: Params, root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else SQLite in the project root."""
    root = root or project_root()
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or params.tracking.uri
        or f"sqlite:///{root / 'mlflow.db'}"
    )


def retry(action: Callable[[], T], attempts: int = 4, first_wait: float = 0.5) -> T:
    """Call `action`, waiting 0.5, 1, 2 s between failed attempts (MLflow raises many types)."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


def _check_server(uri: str) -> None:
    """Fail fast (seconds, not after an hour of training) when an HTTP store does not answer."""
    from urllib.parse import urlparse
    from urllib.request import urlopen

    url = urlparse(uri)
    try:
        with urlopen(f"{url.scheme}://{url.netloc}/health", timeout=5) as response:
            if response.status != 200:
                raise TrackingUnavailable(f"tracking server {uri} answered {response.status}")
    except (TimeoutError, OSError) as exc:
        raise TrackingUnavailable(f"tracking server {uri} is unreachable ({exc})") from None


def connect(params: Params) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    root = project_root()
    uri = tracking_uri(params, root)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifacts = None if uri.startswith("http") else (root / "mlruns").as_uri()
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except Exception as exc:
        raise TrackingUnavailable(
            f"tracking store {uri}: {exc.__class__.__name__}: {exc}"
        ) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"boost": {"temperature": [0.5]}} -> {"boost.temperature": "[0.5]"}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except OSError:
        return ""


def run_tags(fingerprint: str, device: str) -> dict[str, str]:
    tags = {
        "git.commit": _git("rev-parse", "HEAD"),
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "data.fingerprint": fingerprint,
        "host": socket.gethostname(),
        "device": device,
    }
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        tags["dvc.experiment"] = experiment
    return tags


def run_title(params: Params) -> str:
    """What the UI lists: the DVC experiment's name when there is one, else what was trained."""
    variant = "boostnet" if params.boost.enabled else "baseline"
    default = f"{variant}-{params.data.dataset}-seed{params.seed}"
    return os.environ.get("DVC_EXP_NAME") or default


def metric_batches(metrics: Iterable[tuple[str, float, int]], size: int = 900):
    """MLflow's log_batch takes at most 1000 metrics a call."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch: list[Metric] = []
    for key, value, step in metrics:
        batch.append(Metric(key, float(value), now, step))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def log_metrics(run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    """(key, value, step) triples, batched, each batch retried."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for batch in metric_batches(metrics):
        retry(lambda batch=batch: client.log_batch(run_id, metrics=batch))


def log_artifacts(run_id: str, files: Iterable[Path], folder: str | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in files:
        if path.exists():
            retry(lambda path=path: client.log_artifact(run_id, str(path), folder))


def start_run(
    params: Params, fingerprint: str, source: str, previous: Path, name: str | None = None
) -> str:
    """A new run with the whole config as params, or the run an interrupted attempt left in
    `previous` (so a resumed training or search stays one run)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Param

    experiment_id = connect(params)
    client = MlflowClient()
    if previous.exists():
        run_id = previous.read_text().strip()
        retry(lambda: client.update_run(run_id, status="RUNNING"))
        return run_id
    run = retry(
        lambda: client.create_run(
            experiment_id,
            run_name=name or run_title(params),
            tags=run_tags(fingerprint, "pending"),
        )
    )
    run_id = run.info.run_id
    flat = flatten(params.model_dump(mode="json"))
    retry(lambda: client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()]))
    dataset = MetaDataset(
        resolve_dataset_source(source), name=params.data.dataset, digest=fingerprint
    )
    with mlflow.start_run(run_id=run_id):
        retry(lambda: mlflow.log_input(dataset, context="training"))
    previous.parent.mkdir(parents=True, exist_ok=True)
    previous.write_text(run_id)
    return run_id


class _StackedExits(torch.nn.Module):
    """Every exit's logits as one [exits, batch, classes] tensor, so the served model has one
    tensor output (a signature MLflow can describe) instead of a list."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.net(x))


def log_model(run_id: str, net: torch.nn.Module, input_shape: tuple[int, int, int]) -> None:
    """The model as an MLflow LoggedModel of this run.

    Pickle format with an explicit signature and requirements: MLflow's pt2 default traces the
    graph and then reloads it to validate an input example, and without requirements it infers
    them in a subprocess; together ~10 s a run, several percent of the default pipeline. The
    tensor-only checkpoint (`model.pt`, loaded with weights_only=True) stays the source of truth.
    """
    import mlflow
    from mlflow.models import infer_signature

    serving = _StackedExits(net.cpu().eval())
    example = torch.zeros((2, *input_shape))
    with torch.no_grad():
        signature = infer_signature(example.numpy(), serving(example).numpy())
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            serving,
            name="model",
            serialization_format="pickle",
            signature=signature,
            pip_requirements=requirements,
        )


def log_training(
    run_id: str,
    history: list[dict[str, Any]],
    device: str,
    net: torch.nn.Module,
    input_shape: tuple[int, int, int],
    files: list[Path],
) -> None:
    """Per-epoch metrics (step = epoch), the model, and the checkpoint and params files."""
    from mlflow import MlflowClient

    def per_epoch() -> Iterable[tuple[str, float, int]]:
        for record in history:
            step = record["epoch"]
            for key in ("train_loss", "val_top1", "effective_samples"):
                for index, value in enumerate(record[key], start=1):
                    yield f"{key}_exit_{index}", value, step
            for key in ("val_mean_top1", "lr", "images_per_second", "epoch_seconds"):
                if key in record:  # no val_mean_top1 without a held-out split
                    yield key, record[key], step
            if "skipped_images" in record:  # folder datasets: unreadable files left out
                yield "skipped_images", record["skipped_images"], step

    log_metrics(run_id, per_epoch())
    client = MlflowClient()
    retry(lambda: client.set_tag(run_id, "device", device))
    log_artifacts(run_id, files)
    retry(lambda: log_model(run_id, net, input_shape))
    retry(lambda: client.set_terminated(run_id, "FINISHED"))


def log_evaluation(
    run_id: str,
    metrics: dict[str, Any],
    anytime: list[dict[str, Any]],
    budget_curve: list[dict[str, Any]],
    files: list[Path],
) -> None:
    """Laid out for the UI's charts: per-exit values use the exit index as the step (so runs
    overlay accuracy against exit), the budgeted curve uses the expected cost in kFLOPs."""

    def values() -> Iterable[tuple[str, float, int]]:
        for row in anytime:
            yield "test_top1_by_exit", row["top1"], row["exit"]
            yield "test_top5_by_exit", row["top5"], row["exit"]
            yield "mflops_by_exit", row["mflops"], row["exit"]
        for row in sorted(budget_curve, key=lambda r: r["mflops"]):
            step = round(row["mflops"] * 1000)
            yield "budget_top1_by_kflops", row["top1"], step
            yield "budget_top1_flat_by_kflops", row["top1_flat"], step
        yield "test_final_top1", metrics["final_top1"], 0
        yield "test_mean_top1", metrics["mean_top1"], 0
        for row in metrics["budgets"].values():  # MLflow names allow no "+": use MFLOPs
            for key in ("top1", "expected_mflops", "speedup_measured", "speedup_predicted"):
                yield f"budget_{row['target_mflops']:g}M_{key}", row[key], 0

    log_metrics(run_id, values())
    log_artifacts(run_id, files)


# Links DVC outputs to their MLflow run: history.json's `run` (a hash of the params and the
# data), never a store path or run id, so outputs restored from DVC's run-cache, a remote or
# another clone find their run in whatever store the user has.
RUN_TAG = "boostpipe.run"


def link_run(run_id: str, key: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_tag(run_id, RUN_TAG, key)


def find_training_run(client: Any, experiment_ids: list[str], key: str) -> Any:
    """The run that trained `key`: the newest finished one, else the newest; None if none."""
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{RUN_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    return next((r for r in runs if r.info.status == "FINISHED"), runs[0] if runs else None)


def training_run(params: Params, key: str) -> str:
    """The id of the run that trained `key` in the configured store (calibrate and evaluate
    log into it); a store without it raises one line saying so."""
    import mlflow
    from mlflow import MlflowClient

    experiment_id = connect(params)
    run = find_training_run(MlflowClient(), [experiment_id], key)
    if run is None:
        raise TrackingUnavailable(
            f"{mlflow.get_tracking_uri()} has no run that trained {key} (trained against "
            "another store?); `dvc repro --force train` trains and logs it here"
        )
    return run.info.run_id


def best_effort(action: Callable[[], None], what: str) -> None:
    """Tracking after the outputs are written: a failure is reported, never fatal."""
    try:
        action()
    except Exception as exc:
        print(f"warning: could not log {what} to MLflow ({exc.__class__.__name__}: {exc})")


def log_search(run_id: str, outcome: Any, params: Params, folder: Path) -> None:
    """The search's summary on its parent run: the best and default objectives, how trials
    ended, the best trial's per-exit curve (step = exit) and values, and two plots."""
    from mlflow import MlflowClient

    from pipeline import plots
    from pipeline.boosting import BoostNet
    from pipeline.evaluation import exit_costs
    from pipeline.io import write_json

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
        write_json(folder / "best_params.json", best.overrides)
        files += [folder / "best_trial_exits.png", folder / "best_params.json"]
        retry(lambda: client.set_tag(run_id, "tune.best_trial", best.trial_id))
    plots.search_summary(folder / "search_summary.png", outcome.trials, metric)
    write_json(folder / "trials.json", [vars(trial) for trial in outcome.trials])
    files += [folder / "search_summary.png", folder / "trials.json"]
    log_metrics(run_id, values)
    log_artifacts(run_id, files)
    retry(lambda: client.set_terminated(run_id, "FINISHED"))
