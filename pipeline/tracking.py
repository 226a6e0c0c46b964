"""MLflow tracking: one run per trained model, filled in by train, calibrate and evaluate.

The default store is a SQLite database and an artifact folder in the project root, with absolute
paths so that runs made by `dvc exp run --temp/--queue` (in copies under .dvc/tmp/exps) land in the
same store. MLFLOW_TRACKING_URI, or `tracking.uri` in params, selects another store, e.g. an
`mlflow server` on loopback. The store is checked with a real write before training starts;
MLflow's own HTTP retries are bounded (`bound_waits`), and logging after a stage's outputs are
written never costs the stage its outputs. A run's status follows the work (`status_of`):
RUNNING while a stage or search runs, KILLED when interrupted, FAILED on an error, FINISHED
once evaluate (or the search) completes.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params
from pipeline.errors import TrackingUnavailable, describe
from pipeline.verbosity import quiet_driver


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


def local_store(uri: str) -> str | None:
    """The file behind a store on this machine's disk (SQLite, or a folder), which another node
    cannot reach; None for a server."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return uri[len(scheme) :]
    return uri if "://" not in uri else None


# MLflow's HTTP client retries 7 times with backoff and waits up to 120 s a request: minutes
# against a dead server. (retries, seconds per request): worst case about 22 s for a command,
# 49 s for a stage, backoff included. Values already in the environment win.
WAITS = {"interactive": (1, 10), "stage": (2, 15)}


def bound_waits(kind: str = "stage") -> None:
    """Bound MLflow's own retries, so a dead server ends a command within 30 s, a stage within
    60 s; set before the first request (MLflow reads these per request)."""
    retries, timeout = WAITS[kind]
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


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


def reach(uri: str) -> None:
    """Point MLflow at the store with bounded waits (a stage's, unless a command set its own);
    an HTTP store must answer /health first."""
    import mlflow

    bound_waits("stage")
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)


# MLflow's UI opens an experiment on the view its kind asks for: without this tag MLflow 3
# shows the GenAI overview (traces, token usage) instead of the training runs.
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def connect(params: Params) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    quiet_driver()  # importing mlflow puts its loggers back at INFO (store creation lines)
    root = project_root()
    uri = tracking_uri(params, root)
    reach(uri)
    name = params.tracking.experiment
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifacts = None if uri.startswith("http") else (root / "mlruns").as_uri()
            return mlflow.create_experiment(
                name, artifact_location=artifacts, tags={KIND_TAG: TRAINING_KIND}
            )
        if experiment.tags.get(KIND_TAG) != TRAINING_KIND:  # created by an older boostpipe
            mlflow.MlflowClient().set_experiment_tag(
                experiment.experiment_id, KIND_TAG, TRAINING_KIND
            )
        return experiment.experiment_id
    except Exception as exc:
        raise TrackingUnavailable(f"tracking store {uri}: {describe(exc)}") from None


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
    """MLflow's own source tags (its UI shows them) and ours: uncommitted changes, the data."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_TYPE

    tags = {
        MLFLOW_GIT_COMMIT: _git("rev-parse", "HEAD"),
        MLFLOW_GIT_BRANCH: _git("rev-parse", "--abbrev-ref", "HEAD"),
        MLFLOW_SOURCE_TYPE: "LOCAL",
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


def current_uri() -> str:
    """The store MLflow points at now (after `connect` or `start_run`)."""
    import mlflow

    return mlflow.get_tracking_uri()


def log_metrics(run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    """(key, value, step) triples in one log_batch call (MLflow splits it into requests)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value, step in metrics]
    MlflowClient().log_batch(run_id, metrics=batch)


def log_artifacts(run_id: str, files: Iterable[Path], folder: str | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in files:
        if path.exists():
            client.log_artifact(run_id, str(path), folder)


def start_run(
    params: Params, fingerprint: str, source: str, previous: Path, name: str | None = None
) -> str:
    """A new run with the whole config as params, or the run an interrupted attempt left in
    `previous` (so a resumed training or search stays one run), marked RUNNING. Both end with a
    real write (tag `boostpipe.attempt`, the attempt's start), so a store that reads but cannot
    write (read-only, locked) fails here in one line, before any training."""
    from mlflow import MlflowClient

    experiment_id = connect(params)
    client = MlflowClient()
    try:
        if previous.exists():
            run_id = previous.read_text().strip()
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = _create_run(client, experiment_id, params, fingerprint, source, name)
        client.set_tag(run_id, "boostpipe.attempt", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except Exception as exc:
        import mlflow

        raise TrackingUnavailable(
            f"tracking store {mlflow.get_tracking_uri()}: cannot write ({describe(exc)})"
        ) from None
    previous.parent.mkdir(parents=True, exist_ok=True)
    previous.write_text(run_id)
    _opened.append(run_id)
    return run_id


def _create_run(
    client: Any, experiment_id: str, params: Params, fingerprint: str, source: str, name: str | None
) -> str:
    """A RUNNING run with every param, and the training, held-out and test splits as its
    inputs (MLflow's dataset contexts training, validation and testing)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, Param
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    run = client.create_run(
        experiment_id, run_name=name or run_title(params), tags=run_tags(fingerprint, "pending")
    )
    run_id = run.info.run_id
    flat = flatten(params.model_dump(mode="json"))
    client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])
    # MLflow registers its local-file source class twice, so resolving a local path warns that
    # it "can be interpreted in multiple ways" (the same class, twice) on every run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        origin = resolve_dataset_source(source)
    splits = {"train": "training", "val": "validation", "test": "testing"}
    if not params.data.val_size:
        del splits["val"]  # nothing held out
    inputs = [
        DatasetInput(
            MetaDataset(
                origin, name=f"{params.data.dataset}/{split}", digest=fingerprint
            )._to_mlflow_entity(),
            tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
        )
        for split, context in splits.items()
    ]
    client.log_inputs(run_id, inputs)
    return run_id


_opened: list[str] = []  # runs this process opened (start_run, resume_run), newest last


@contextmanager
def status_of(run_id: str | None = None, finish: bool = False) -> Iterator[None]:
    """The run's status follows the block: KILLED when it is interrupted (Ctrl-C, SIGTERM),
    FAILED when it raises, FINISHED when it completes and `finish`, else still RUNNING.
    Without `run_id`: the run this process opened, if any (every stage runs in such a block;
    evaluate's logging finishes the run). A failing store costs one warning line."""

    def end(status: str) -> None:
        target = run_id or (_opened[-1] if _opened else None)
        if target is not None:
            best_effort(lambda: _terminate(target, status), "the run's status")
        if target in _opened:
            _opened.remove(target)  # ended once, not again by an enclosing block

    try:
        yield
    except KeyboardInterrupt:
        end("KILLED")
        raise
    except Exception:
        end("FAILED")
        raise
    if finish:
        end("FINISHED")


def _terminate(run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status)


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
    MLflow's warning that pickled models run code when loaded is kept off the console: this one
    is written by the pipeline itself, and the warning would repeat on every run.
    """

    import mlflow
    from mlflow.models import infer_signature

    serving = _StackedExits(net.cpu().eval())
    example = torch.zeros((2, *input_shape))
    with torch.no_grad():
        signature = infer_signature(example.numpy(), serving(example).numpy())
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    # Into the run by id (`start_run` would end it, FINISHED), in the run's experiment.
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    level = pytorch_logger.level
    pytorch_logger.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.log_model(
            serving,
            name="model",
            serialization_format="pickle",
            signature=signature,
            pip_requirements=requirements,
            # The pickle refers to classes of this package: shipped with the model, it loads
            # (`mlflow.pytorch.load_model`) where only torch and mlflow are installed.
            code_paths=[str(Path(__file__).parent)],
            run_id=run_id,
        )
    finally:
        pytorch_logger.setLevel(level)


def log_training(
    run_id: str,
    history: list[dict[str, Any]],
    device: str,
    net: torch.nn.Module,
    input_shape: tuple[int, int, int],
    files: list[Path],
) -> None:
    """After training: the epochs that were not logged as they ended (an interruption between
    an epoch's checkpoint and its logging), the device, the model, and the checkpoint and
    params files; the run stays RUNNING (evaluate finishes it)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "epoch_seconds")}
    missing = [record for record in history if record["epoch"] not in logged]
    if missing:
        log_metrics(run_id, (metric for record in missing for metric in epoch_metrics(record)))
    client.set_tag(run_id, "device", device)
    log_artifacts(run_id, files)
    log_model(run_id, net, input_shape)


def epoch_metrics(record: dict[str, Any]) -> Iterator[tuple[str, float, int]]:
    """One epoch of `history.json` as (key, value, step = epoch) metrics."""
    step = record["epoch"]
    for key in ("train_loss", "val_top1", "effective_samples"):
        for index, value in enumerate(record[key], start=1):
            yield f"{key}_exit_{index}", value, step
    for key in ("val_mean_top1", "lr", "images_per_second", "epoch_seconds", "compile_seconds"):
        if key in record:  # no val_mean_top1 without a held-out split; compile once
            yield key, record[key], step
    if "skipped_images" in record:  # folder datasets: unreadable files left out
        yield "skipped_images", record["skipped_images"], step


def log_epoch(target: dict[str, str], record: dict[str, Any]) -> None:
    """As an epoch ends, from rank 0's Ray worker, so the UI's charts grow while training runs
    (`target`: the store's URI and the run id). A resumed run logs only the epochs it trains."""
    import mlflow

    if mlflow.get_tracking_uri() != target["uri"]:
        bound_waits("stage")
        mlflow.set_tracking_uri(target["uri"])
    best_effort(lambda: log_metrics(target["run_id"], epoch_metrics(record)), "epoch metrics")


def register(run_id: str, name: str) -> str:
    """The run's logged model as a new version of registered model `name`, aliased `evaluated`
    (MLflow's registry; the alias follows the latest evaluated version). Returns the version."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    model_id = client.get_run(run_id).outputs.model_outputs[-1].model_id
    version = mlflow.register_model(f"models:/{model_id}", name).version
    client.set_registered_model_alias(name, "evaluated", version)
    return version


def log_evaluation(
    run_id: str,
    metrics: dict[str, Any],
    anytime: list[dict[str, Any]],
    budget_curve: list[dict[str, Any]],
    files: list[Path],
) -> None:
    """Laid out for the UI's charts: per-exit values use the exit index as the step (so runs
    overlay accuracy against exit), the budgeted curve uses the expected cost in kFLOPs. The
    run is FINISHED: evaluate is the last stage."""

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
    _terminate(run_id, "FINISHED")
    if run_id in _opened:
        _opened.remove(run_id)  # finished: not ended again by the stage's status_of


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


def resume_run(params: Params, key: str) -> str | None:
    """The run that trained `key` in the configured store, marked RUNNING again while a later
    stage logs into it (calibrate, evaluate). None, after one warning line, when the store is
    dead or lacks the run: the stage's own outputs are written all the same."""
    from mlflow import MlflowClient

    found: list[str] = []

    def reopen() -> None:
        run_id = training_run(params, key)
        _opened.append(run_id)
        found.append(run_id)
        MlflowClient().update_run(run_id, status="RUNNING")

    best_effort(reopen, "the training run")
    return found[0] if found else None


_failed: list[str] = []  # what best_effort could not log; after one failure it stops trying


def best_effort(action: Callable[[], None], what: str) -> None:
    """Tracking beside a stage's work: a failure is one warning line, never fatal, and later
    calls are skipped (a dead server is not waited on again, nor reported twice)."""
    if _failed:
        return
    try:
        action()
    except Exception as exc:
        _failed.append(what)
        print(
            f"warning: could not log {what} to MLflow ({describe(exc)}); going on without it",
            file=sys.stderr,
        )
