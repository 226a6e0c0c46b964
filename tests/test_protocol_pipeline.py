"""The paper's protocol through the real stages: training on every image with the last epoch
kept (`data.val_size: 0`), and `boostpipe compare --paper` on finished runs."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from helpers import ROOT, needs_data, run, set_params, shrunk_copy

from pipeline.data import Split, save_splits
from pipeline.io import read_json


@pytest.mark.slow
@needs_data
def test_val_size_zero_trains_on_every_image_and_records_no_calibration(tmp_path):
    repo = shrunk_copy(tmp_path)
    params = set_params(
        repo,
        **{"data.val_size": 0, "data.train_subset": 600},
        **{"train.epochs": 2, "train.select": "last"},
    )
    result = run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data.val_size is 0: no held-out split" in result.stdout

    assert read_json(repo / "data/dataset.json")["val"] == 0
    history = read_json(repo / "outputs/train/history.json")
    assert (history["best_epoch"], history["select"]) == (2, "last")
    assert all(record["val_top1"] == [] for record in history["epochs"])
    thresholds = read_json(repo / "outputs/calibrate/thresholds.json")
    assert thresholds["calibrated"] is False and thresholds["budgets"] == []
    metrics = read_json(repo / "outputs/evaluate/metrics.json")
    assert metrics["calibrated"] is False and metrics["budgets"] == {}
    assert len(metrics["anytime"]["top1"]) == params["model"]["n_blocks"]
    for command in (["dvc", "metrics", "show"], ["dvc", "plots", "show", "--json"]):
        shown = run(command, repo)
        assert shown.returncode == 0, shown.stdout + shown.stderr

    # the default dataset has no published numbers: one line, nothing written
    compared = run(["boostpipe", "compare", "workspace", "--paper", "auto"], repo)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert compared.stdout.strip() == "no published numbers exist for fashion-mnist"
    assert not (repo / "compare.png").exists()


def _cifar100_shaped(n: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, 100, (n,), generator=generator))


@pytest.mark.slow
def test_compare_with_the_paper_on_a_shortened_cifar100_paper_run(tmp_path):
    """The paper's CIFAR-100 anytime configuration, shortened, through the real train, profile,
    calibrate and evaluate stages on generated images of CIFAR-100's shape (the real files are
    not obtainable here; prepare's output is written the way prepare writes it)."""
    repo = shrunk_copy(tmp_path)
    shutil.copy(ROOT / "configs/cifar100-msdnet-anytime.yaml", repo / "params.yaml")  # unshrunk
    set_params(
        repo,
        **{"train.epochs": 1, "train.batch_size": 32},
        **{"train.scaling.workers": 1, "train.scaling.cpus_per_worker": 1},
        **{"train.scaling.use_gpu": False},
        **{"evaluate.batch_size": 64, "evaluate.timing_repeats": 1},
        **{"profile.repeats": 1, "profile.warmup": 0, "profile.batch1_images": 4},
    )
    (repo / "data").mkdir(exist_ok=True)
    save_splits(
        repo / "data/prepared.npz",
        {
            "train": _cifar100_shaped(96, 0),
            "val": _cifar100_shaped(0, 1),
            "test": _cifar100_shaped(64, 2),
        },
    )
    info = {"dataset": "cifar100", "source": "generated", "fingerprint": "generated0000000"}
    (repo / "data/dataset.json").write_text(json.dumps(info | {"train": 96, "val": 0, "test": 64}))
    for stage in ("train", "profile", "calibrate", "evaluate"):
        result = run([sys.executable, "-m", f"stages.{stage}"], repo)
        assert result.returncode == 0, stage + result.stdout + result.stderr

    compared = run(
        ["boostpipe", "compare", "workspace", "--paper", "auto", "--output", "paper.png"], repo
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    out = compared.stdout
    assert "cifar100-msdnet-anytime" in out and "published BoostNet" in out
    metrics = read_json(repo / "outputs/evaluate/metrics.json")
    for exit_index, paper in ((1, 65.32), (10, 76.30)):
        ours = metrics["anytime"]["top1"][f"exit_{exit_index}"]
        row = next(line for line in out.splitlines() if f"exit {exit_index} " in line)
        cells = row.replace("│", " ").split()
        assert f"{paper:.2f}" in cells and f"{ours:.2f}" in cells
        assert f"{ours - paper:+.2f}" in cells
    assert (repo / "paper.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a setting of another shape is refused in one line
    other = run(["boostpipe", "compare", "workspace", "--paper", "imagenet-msdnet-anytime"], repo)
    assert other.stdout.strip() == "imagenet-msdnet-anytime has 5 exits but the run has 10"
