"""The trained model's MLflow record sent from kept files: apart from `pipeline.tracking`, which
every stage imports, because it rebuilds the net (the stages that never log must not depend on
the models)."""

from __future__ import annotations

from pipeline.boosting import BoostNet
from pipeline.config import load_params
from pipeline.epochs import EpochRecord
from pipeline.io import load_checkpoint
from pipeline.tracking.export import log_training
from pipeline.tracking.outbox import Record


def send_training(run_id: str, record: Record) -> None:
    """A training record kept while the store was away: the net is rebuilt from the kept
    checkpoint and params file, as the stages load it."""
    params = load_params(record.file("params.yaml")).with_dataset(record.details["dataset"])
    net = BoostNet.from_params(params)
    net.load_state_dict(load_checkpoint(record.file("model.pt"))["model"])
    history = [EpochRecord.from_json(row) for row in record.details["epochs"]]
    files = [record.file("model.pt"), record.file("params.yaml")]
    log_training(run_id, history, record.details["platform"], net, params.input_shape, files)
