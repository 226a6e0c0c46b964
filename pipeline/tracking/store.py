"""The MLflow store: which one (URI), reaching it with bounded waits, and its experiment.

The default store is a SQLite database and an artifact folder in the project root, with absolute
paths so that runs made by `dvc exp run --temp/--queue` (in copies under .dvc/tmp/exps) land in the
same store. MLFLOW_TRACKING_URI, or `tracking.uri` in params, selects another store, e.g. an
`mlflow server` on loopback. MLflow's own HTTP retries are bounded (`bound_waits`), and an HTTP
store must answer its health check before anything waits on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import TrackingUnavailable, describe_failure
from pipeline.locks import waited
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
# against a dead server. (retries, seconds per request) per kind of caller; values already in
# the environment win.
WAITS = {"interactive": (1, 10), "stage": (2, 15)}


def bound_waits(kind: str = "stage") -> None:
    """Bound MLflow's own retries, so a dead server ends a command within 30 s, a stage within
    60 s; set before the first request (MLflow reads these per request)."""
    retries, timeout = WAITS[kind]
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def check_server(uri: str) -> None:
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
        check_server(uri)
    mlflow.set_tracking_uri(uri)


# MLflow's UI opens an experiment on the view its kind asks for: without this tag MLflow 3
# shows the GenAI overview (traces, token usage) instead of the training runs.
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


SETUP_WAIT_S = 120.0  # another process creating the same SQLite store: its migrations


@contextmanager
def _one_at_a_time(uri: str) -> Iterator[None]:
    """For a SQLite store, one process at a time creates its tables (MLflow's migrations fail
    when two run at once: `dvc queue start -j 2` on a new project) and its experiment."""
    database = local_store(uri) if uri.startswith("sqlite:///") else None
    if database is None:
        yield
        return
    with waited(Path(f"{database}.lock"), f"tracking store {uri}", SETUP_WAIT_S):
        yield


def connect(params: Params) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    quiet_driver()  # importing mlflow puts its loggers back at INFO (store creation lines)
    root = project_root()
    uri = tracking_uri(params, root)
    reach(uri)
    name = params.tracking.experiment
    try:
        with _one_at_a_time(uri):
            return _experiment_id(uri, name, root)
    except Exception as exc:
        raise TrackingUnavailable(f"tracking store {uri}: {describe_failure(exc)}") from None


def _experiment_id(uri: str, name: str, root: Path) -> str:
    """The experiment's id, created (tagged as a training experiment) when missing."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifacts = None if uri.startswith("http") else (root / "mlruns").as_uri()
        return mlflow.create_experiment(
            name, artifact_location=artifacts, tags={KIND_TAG: TRAINING_KIND}
        )
    if experiment.tags.get(KIND_TAG) != TRAINING_KIND:  # created by an older boostpipe
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def current_uri() -> str:
    """The store MLflow points at now (after `connect` or `start_run`)."""
    import mlflow

    return mlflow.get_tracking_uri()
