"""The trained model in MLflow: logged as the run's LoggedModel after training (with the epochs
that were not logged live), and registered once evaluated."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.epochs import EpochRecord
from pipeline.tracking.logs import epoch_metrics, log_artifacts, log_metrics
from pipeline.tracking.names import EPOCH_SECONDS, metric_history
from pipeline.tracking.outbox import Record

PACKAGE = Path(__file__).parents[1]  # pipeline/: shipped with the model (its pickle needs it)


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
    them in a subprocess, both slow on every run. The tensor-only checkpoint (`model.pt`,
    loaded with weights_only=True) stays the source of truth. MLflow's warning that pickled
    models run code when loaded is kept off the console: this one is written by the pipeline
    itself, and the warning would repeat on every run.
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
            code_paths=[str(PACKAGE)],
            run_id=run_id,
        )
    finally:
        pytorch_logger.setLevel(level)


def log_training(
    run_id: str,
    history: list[EpochRecord],
    platform: dict[str, str],
    net: torch.nn.Module,
    input_shape: tuple[int, int, int],
    files: list[Path],
) -> None:
    """After training: the epochs that were not logged as they ended (an interruption between
    an epoch's checkpoint and its logging, a store that was away), the device and platform
    (`platform.*` tags), the model
    (unless a first attempt logged it), and the checkpoint and params files; the run stays
    RUNNING (evaluate finishes it)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    logged = {m.step for m in metric_history(client, run_id, EPOCH_SECONDS)}
    missing = [record for record in history if record.epoch not in logged]
    if missing:
        log_metrics(run_id, (metric for record in missing for metric in epoch_metrics(record)))
    client.set_tag(run_id, "device", platform["device"])
    for key, value in platform.items():
        client.set_tag(run_id, f"platform.{key}", value)
    log_artifacts(run_id, files)
    if not client.get_run(run_id).outputs.model_outputs:
        log_model(run_id, net, input_shape)


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


def send_registry(run_id: str, record: Record) -> None:
    name = record.details["name"]
    print(f"registered {name} v{register(run_id, name)} (alias evaluated)")
