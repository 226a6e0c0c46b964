"""A folder dataset end to end: `dvc repro` on real JPEG/PNG/WebP files in ImageNet layout with
data.dataset: imagefolder and random-resized-crop, in a shrunk copy of the repository, with one
corrupt JPEG that data.skip_bad: true skips and counts; without skip_bad the same file stops
training with one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import run, set_params, shrunk_copy, write_image_folder

from pipeline.data import FileSplit, load_split
from pipeline.io import read_json

CORRUPT = "train/n00000001/corrupt.JPEG"


@pytest.fixture(scope="module")
def folder_project(tmp_path_factory) -> Path:
    images = write_image_folder(tmp_path_factory.mktemp("images") / "ds", per_class=20)
    (images / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 50)
    repo = shrunk_copy(tmp_path_factory.mktemp("folder-project"))
    set_params(
        repo,
        **{"data.dataset": "imagefolder", "data.root": str(images), "data.image_size": 32},
        **{"data.val_size": 12, "data.train_subset": None, "data.test_subset": None},
        **{"data.skip_bad": True},
        **{"train.augment": "random-resized-crop", "train.batch_size": 16},
        **{"train.loader_workers": 1},
        **{"calibrate.budgets": [1.0e9]},  # above the last exit's cost: every image goes there
    )
    result = run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped 1 unreadable image(s)" in result.stdout  # printed by train
    return repo


@pytest.mark.slow
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


@pytest.mark.slow
def test_without_skip_bad_a_corrupt_jpeg_stops_training_naming_it(folder_project):
    model = (folder_project / "outputs/train/model.pt").read_bytes()
    set_params(folder_project, **{"data.skip_bad": False})
    result = run(["dvc", "repro"], folder_project)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"error: data.root: cannot decode {CORRUPT}" in output
    assert not (folder_project / "outputs/train/model.pt").exists()  # DVC removed it first
    set_params(folder_project, **{"data.skip_bad": True})
    restored = run(["dvc", "repro"], folder_project)  # the last good results, from the run-cache
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
@pytest.mark.slow
def test_prepare_refuses_a_broken_layout_in_one_line(tmp_path, damage, expected):
    root = write_image_folder(tmp_path / "ds", per_class=2, val_per_class=1)
    damage(root)
    repo = tmp_path / "repo"
    repo.mkdir()
    shrunk_copy(repo)
    set_params(
        repo, **{"data.dataset": "imagefolder", "data.root": str(root), "data.image_size": 32}
    )
    result = run(["python", "-m", "stages.prepare"], repo)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: data.root: {expected}")
    assert not (repo / "data/prepared.npz").exists()
