"""A folder dataset end to end: `dvc repro` on real JPEG/PNG/WebP files in ImageNet layout with
data.dataset: imagefolder and random-resized-crop, in a shrunk copy of the repository, with one
corrupt JPEG that data.skip_bad: true skips and counts; without skip_bad the same file stops
training with one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_image_folder
from test_pipeline import _run, _shrunk_copy

from pipeline.data import FileSplit, load_split
from pipeline.io import read_json

pytestmark = pytest.mark.slow
CORRUPT = "train/n00000001/corrupt.JPEG"


def _set(repo: Path, **sections: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def folder_project(tmp_path_factory) -> Path:
    images = write_image_folder(tmp_path_factory.mktemp("images") / "ds", per_class=20)
    (images / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 50)
    repo = _shrunk_copy(tmp_path_factory.mktemp("folder-project"))
    _set(
        repo,
        data={
            "dataset": "imagefolder",
            "root": str(images),
            "image_size": 32,
            "val_size": 12,
            "train_subset": None,
            "test_subset": None,
            "skip_bad": True,
        },
        train={"augment": "random-resized-crop", "batch_size": 16, "loader_workers": 1},
        calibrate={"budgets": [1.0e9]},  # above the last exit's cost: every image goes there
    )
    result = _run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped 1 unreadable image(s)" in result.stdout  # printed by train
    return repo


def test_dvc_repro_trains_calibrates_and_evaluates_on_image_files(folder_project):
    info = read_json(folder_project / "data/dataset.json")
    assert info["num_classes"] == 3 and info["classes"] == ["n00000000", "n00000001", "n00000002"]
    assert (info["train"], info["val"], info["test"]) == (49, 12, 12)
    train = load_split(folder_project / "data/prepared.npz", "train")
    assert isinstance(train, FileSplit) and not any(f.endswith(".txt") for f in train.files)
    saved = torch.load(folder_project / "outputs/train/model.pt", weights_only=True)
    classifiers = [v for k, v in saved["model"].items() if k.startswith("backbone.heads.")]
    assert classifiers[-1].shape[0] == 3  # the class count came from the folder
    (epoch,) = read_json(folder_project / "outputs/train/history.json")["epochs"]
    assert epoch["skipped_images"] == 1 and epoch["images_per_second"] > 0
    metrics = read_json(folder_project / "outputs/evaluate/metrics.json")
    n_exits = yaml.safe_load((folder_project / "params.yaml").read_text())["model"]["n_blocks"]
    assert len(metrics["anytime"]["top1"]) == n_exits
    assert all(0 <= v <= 100 for v in metrics["anytime"]["top1"].values())


def test_without_skip_bad_a_corrupt_jpeg_stops_training_naming_it(folder_project):
    model = (folder_project / "outputs/train/model.pt").read_bytes()
    _set(folder_project, data={"skip_bad": False})
    result = _run(["dvc", "repro"], folder_project)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"error: data.root: cannot decode {CORRUPT}" in output
    assert not (folder_project / "outputs/train/model.pt").exists()  # DVC removed it first
    _set(folder_project, data={"skip_bad": True})
    restored = _run(["dvc", "repro"], folder_project)  # the last good results, from the run-cache
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "Stage 'train' is cached - skipping run" in restored.stdout
    assert (folder_project / "outputs/train/model.pt").read_bytes() == model


def _empty_class(root: Path) -> None:
    for split in ("train", "val"):
        (root / split / "n00000042").mkdir()
    (root / "val/n00000042/x.JPEG").write_bytes((root / "val/n00000001/val_1_0.JPEG").read_bytes())


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda root: (root / "val/n00000042").mkdir(), "val/ classes differ from train/"),
        (_empty_class, "train/n00000042/ holds no images"),
    ],
)
def test_prepare_refuses_a_broken_layout_in_one_line(tmp_path, damage, expected):
    root = write_image_folder(tmp_path / "ds", per_class=2, val_per_class=1)
    damage(root)
    repo = tmp_path / "repo"
    repo.mkdir()
    _shrunk_copy(repo)
    _set(repo, data={"dataset": "imagefolder", "root": str(root), "image_size": 32})
    result = _run(["python", "-m", "stages.prepare"], repo)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: data.root: {expected}")
    assert not (repo / "data/prepared.npz").exists()
