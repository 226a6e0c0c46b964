"""Early-exit inference on users' own image files (`boostpipe predict`).

Files are decoded and cropped as evaluation reads the dataset (pipeline/inputs.py: grey for
Fashion-MNIST, resize + centre crop for folder datasets) in loader processes, and every batch runs
the same early exit as evaluate (`evaluation.ExitQueue`), so a test image saved as PNG gets the
prediction evaluate gave it. Thresholds come from the calibrate stage's output: the ones fitted
for a budget in FLOPs or in ms per image (read against the profile stage's measured exit costs,
which must come from this device and thread count), or a file of one threshold per exit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import paths
from pipeline.boosting import BoostNet
from pipeline.budgets import Calibration, in_ms
from pipeline.config import ConfigError, Params, load_params
from pipeline.config.base import time_budget
from pipeline.data import FileSplit
from pipeline.evaluation import ExitQueue, exit_costs, load_model, network_input
from pipeline.folders import IMAGE_SUFFIXES
from pipeline.inputs import file_loader
from pipeline.io import read_json
from pipeline.profiling import BATCH_1, ExitProfile, Machine, apply_threads

UNREADABLE_EXIT_CODE = 3  # some files could not be decoded; every other image was predicted


class MissingOutput(FileNotFoundError):
    """A pipeline output predict needs (model, dataset facts, thresholds) is not there."""


# DVC-tracked outputs come from the remote when another machine made them, else are made here.
BRINGS = "`dvc pull` brings it from the project's DVC remote, or `dvc repro` makes it"


@dataclass(frozen=True)
class Prediction:
    file: str
    label: int
    name: str | None  # the class name, when the dataset has names
    confidence: float  # max softmax probability at the exit it left at
    exit: int  # 1-based
    flops: int  # cost of reaching that exit


@dataclass(frozen=True)
class Outcome:
    predictions: list[Prediction]
    unreadable: list[str]  # "file (reason)"
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Workspace:
    """What the pipeline left for inference: params, trained model, exit costs, calibration."""

    params: Params
    net: BoostNet
    exit_flops: list[int]
    names: list[str] | None
    calibration: Calibration


def load_workspace(params_path: Path, device: torch.device) -> Workspace:
    """The trained model (weights only) and what goes with it; one line naming what is missing
    and how to make it."""
    for path, stage in ((paths.MODEL, "train"), (paths.THRESHOLDS, "calibrate")):
        if not path.exists():
            raise MissingOutput(f"{path}: not found; {BRINGS} (stage {stage}) first")
    info = read_json(paths.DATASET_INFO) if paths.DATASET_INFO.exists() else {}
    params = load_params(params_path).with_dataset(info)
    net = load_model(params, paths.MODEL, device)
    names = class_names(params, info)
    calibration = Calibration.from_json(read_json(paths.THRESHOLDS))
    return Workspace(params, net, exit_costs(net, params), names, calibration)


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Files as named, and the image files under each folder (recursively, sorted). A named
    file is kept whatever its suffix, so a wrong one is reported as unreadable, not ignored."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += sorted(p for p in found if p.is_file())
        else:
            files.append(path)
    return files


def class_names(params: Params, dataset_info: dict[str, Any]) -> list[str] | None:
    """Folder datasets' class folders (from prepare), Fashion-MNIST's labels, else None."""
    if "classes" in dataset_info:
        return list(dataset_info["classes"])
    if params.data.dataset == "fashion-mnist":
        from torchvision.datasets import FashionMNIST

        return list(FashionMNIST.classes)
    return None


def thresholds_for(
    calibration: Calibration, budget: float | str | None, currency: str, key: str
) -> list[float]:
    """The calibrated thresholds for `budget` per image in `currency` (FLOPs, or ms in a
    regime: a number as typed, or "N%" of the last exit's cost); no budget: the middle target
    budget of calibrate.budgets."""
    if not calibration.calibrated or not (calibration.budgets or calibration.time_budgets):
        raise ConfigError(
            f"{key}: the workspace has no calibrated thresholds (data.val_size 0?); "
            "give --thresholds FILE"
        )
    if budget is None:
        rows = calibration.budgets or calibration.time_budgets
        return list(rows[len(rows) // 2].thresholds)
    if isinstance(budget, str):
        budget = in_ms(_typed_time_budget(budget, key), calibration.costs(currency))
    return calibration.thresholds_for(budget, currency, key)


def _typed_time_budget(text: str, key: str) -> float | str:
    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    try:
        return time_budget(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc} (got {text!r})") from None


def time_budget_profile(
    params: Params, device: torch.device, regime: str, batch_size: int
) -> ExitProfile:
    """The profile a time budget is read against, refused in one line unless it was measured
    on this device, CPU and thread count, in the regime predict is about to run."""
    if not paths.EXIT_COSTS.exists():
        raise MissingOutput(f"{paths.EXIT_COSTS}: not found; {BRINGS} (stage profile) first")
    profile = ExitProfile.from_json(read_json(paths.EXIT_COSTS))
    apply_threads(params.evaluate.threads)
    served = 1 if regime == BATCH_1 else profile.batch_size
    if batch_size != served:
        raise ConfigError(
            f"--budget-ms: {regime} budgets hold at batch size {served}, not {batch_size}"
        )
    profile.check_serves(Machine.current(device), profile.batch_size, paths.EXIT_COSTS)
    return profile


def read_thresholds(path: Path, n_exits: int) -> list[float]:
    """A JSON list of one threshold per exit, or an object with such a `thresholds` list (a row
    of the calibrate output); the last exit takes every image that is left, whatever its value."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--thresholds: cannot read {path} ({exc})") from None
    values = data.get("thresholds") if isinstance(data, dict) else data
    if not isinstance(values, list) or len(values) != n_exits:
        raise ConfigError(f"--thresholds: {path} must hold {n_exits} numbers, one per exit")
    try:
        return [float(v) for v in values[:-1]] + [float("-inf")]
    except (TypeError, ValueError):
        raise ConfigError(f"--thresholds: {path} holds a value that is not a number") from None


@torch.no_grad()
def predict(
    net: BoostNet,
    params: Params,
    files: Sequence[Path],
    thresholds: list[float],
    exit_flops: Sequence[int],
    *,
    names: list[str] | None = None,
    batch_size: int = 512,
    workers: int = 0,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Early exit on every file (an `ExitQueue` over the loader's batches); unreadable files are
    collected, not fatal. `progress` is called with the number of files each batch finished."""
    device = device or torch.device("cpu")
    spec = params.data.spec
    # The file's index travels as its "target", so results find their file past skipped ones.
    split = FileSplit(np.array([str(f) for f in files]), torch.arange(len(files)))
    loader = file_loader(split, Path("."), params.data, batch_size, workers=workers)
    queue = ExitQueue(net, thresholds, batch_size)
    unreadable: list[str] = []
    net.eval()
    start = time.perf_counter()
    for images, indices, bad in loader:
        unreadable += bad
        if len(indices):
            queue.push(network_input(images, spec.mean, spec.std, device), indices)
        if progress is not None:
            progress(len(indices) + len(bad))
    indices, exited = queue.finish()
    rows = zip(
        indices.tolist(),
        exited.predictions.tolist(),
        exited.confidence.tolist(),
        exited.exits.tolist(),
        strict=True,
    )
    predictions = [
        Prediction(str(files[i]), y, names[y] if names else None, c, k + 1, exit_flops[k])
        for i, y, c, k in rows
    ]
    return Outcome(predictions, unreadable, time.perf_counter() - start)
