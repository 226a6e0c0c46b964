"""What every stage after prepare starts from: params.yaml, validated, with the dataset facts
prepare found (data/dataset.json: the class count of an image folder, the data fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import paths
from pipeline.config import Params, load_params
from pipeline.io import read_json


@dataclass(frozen=True)
class StageInput:
    params: Params  # with the dataset's class count applied
    dataset: dict[str, Any]  # data/dataset.json as prepare wrote it


def stage_input() -> StageInput:
    """The params file and data/dataset.json, both read from the project root (where DVC runs
    stages); a bad key or a missing file stops the stage in one line."""
    dataset = read_json(paths.DATASET_INFO)
    return StageInput(load_params(paths.PARAMS).with_dataset(dataset), dataset)
