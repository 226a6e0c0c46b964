"""Tests compose the project's real params files and shrink them, never a hand-written config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Params, parse_with_overrides
from pipeline.models import MSDNet, MSDNetSpec, RANet, RANetSpec
from pipeline.rayenv import prepare_ray

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
prepare_ray()  # before any test module imports ray


# The files that run whole pipelines, longest first (per-file time in CI, 2026-11-26).
LONGEST_FILES = (
    "test_faults.py",
    "test_pipeline.py",
    "test_tuning.py",
    "test_object_storage.py",
    "test_cluster.py",
    "test_protocol_pipeline.py",
    "test_folder_pipeline.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first. `make test` hands whole files to two workers (xdist
    --dist loadfile) in this order; a long file left to the end would keep one worker busy
    while the other idles. The sort is stable, so each file keeps its own order."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def raw_params(path: Path = ROOT / "params.yaml") -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def compose(path: Path = ROOT / "params.yaml", **overrides: Any) -> Params:
    """The real params file with dotted-key overrides, e.g. compose(**{"model.n_blocks": 3})."""
    return parse_with_overrides(raw_params(path), overrides, str(path))


def trained_run(uri: str, repo: Path) -> Any:
    """The MLflow run (in the store at `uri`) that trained the outputs in `repo`: the stages
    link them by history.json's `run`, never by a run id in the outputs."""
    from mlflow import MlflowClient

    from pipeline.tracking import find_training_run

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("boostpipe")
    key = json.loads((repo / "outputs/train/history.json").read_text())["run"]
    run = find_training_run(client, [experiment.experiment_id], key)
    assert run is not None, f"{uri} has no run of {key}"
    return run


def imagenet_slow(values: list[Any], name: Any = lambda value: value.stem) -> list[Any]:
    """Parameters for `parametrize`, named by `name`; ImageNet-sized ones (seconds each on a CPU)
    are marked slow, so that `make test-fast` stays under a minute."""
    return [
        pytest.param(value, id=name(value), marks=[pytest.mark.slow] * ("imagenet" in name(value)))
        for value in values
    ]


@pytest.fixture(params=imagenet_slow(PARAMS_FILES))
def params_file(request: pytest.FixtureRequest) -> Path:
    return request.param


def grey_msdnet(**overrides: Any) -> MSDNet:
    """A small MSDNet for grey images, built directly from a spec (no dataset rules)."""
    spec = dict(
        n_blocks=4,
        base=2,
        step=2,
        step_mode="even",
        n_channels=8,
        growth_rate=4,
        gr_factor=(1, 2, 4),
        bn_factor=(1, 2, 4),
        bottleneck=True,
        prune="max",
        reduction=0.5,
        in_channels=1,
        num_classes=10,
        stem="small",
    )
    return MSDNet(MSDNetSpec(**{**spec, **overrides}))


def grey_ranet(**overrides: Any) -> RANet:
    """A small RANet for grey 28x28 images with 4 exits (one per sub-network), from a spec."""
    spec = dict(
        n_blocks=1,
        step=2,
        step_mode="even",
        n_channels=4,
        growth_rate=4,
        scale_list=(1, 2, 3, 3),
        gr_factor=(4, 2, 1, 1),
        bn_factor=(4, 2, 1, 1),
        compress_factor=0.25,
        bn_after=True,
        reduction=0.5,
        in_channels=1,
        num_classes=10,
        stem="small",
    )
    return RANet(RANetSpec(**{**spec, **overrides}))


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 12, val_per_class: int = 4, seed: int = 0
) -> Path:
    """A small ImageNet-layout dataset of real JPEGs of varying sizes (root/{train,val}/<wnid>/),
    each class a different mean colour so a model can learn something; one PNG and one WebP per
    split, and a non-image file that must be ignored."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(40, 120, size=2))
                base = np.zeros(3)
                base[label % 3] = 200
                pixels = base + rng.normal(0, 40, size=(height, width, 3))
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                suffix = {0: ".png", 1: ".webp"}.get(i, ".JPEG") if label == 0 else ".JPEG"
                image.save(folder / f"{split}_{label}_{i}{suffix}")
        (root / split / "n00000000" / "notes.txt").write_text("not an image\n")
    return root
