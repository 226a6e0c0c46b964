"""`train.compile`: when `auto` compiles, and a compiled DDP run on real Ray workers that reports
its compilation apart from its throughput and saves the plain (uncompiled) module's weights."""

from __future__ import annotations

import pytest
import torch
from helpers import compose, needs_data, run, set_params, shrunk_copy

from pipeline.boosting import BoostNet
from pipeline.config import load_params
from pipeline.fitting import COMPILE_AUTO_EPOCHS, compiles
from pipeline.io import load_checkpoint, read_json
from pipeline.training import run_name

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("setting", "device", "epochs", "expected"),
    [
        ("auto", CPU, 3, False),
        ("auto", CPU, COMPILE_AUTO_EPOCHS, True),
        ("auto", CUDA, 1, True),
        (True, CPU, 1, True),
        (False, CUDA, 300, False),
    ],
)
def test_auto_compiles_on_cuda_and_long_cpu_runs(setting, device, epochs, expected):
    config = compose(**{"train.compile": setting}).train
    assert compiles(config, device, epochs) is expected


def test_compiling_does_not_change_which_run_resumes():
    eager, compiled = compose(**{"train.compile": False}), compose(**{"train.compile": True})
    assert run_name(eager, "data") == run_name(compiled, "data")
    assert run_name(eager, "data") != run_name(compose(**{"train.lr": 0.05}), "data")


@pytest.mark.slow
@needs_data
def test_compiled_training_on_two_ray_workers(tmp_path):
    repo = shrunk_copy(tmp_path)
    set_params(
        repo,
        **{"model.n_blocks": 2},  # a small graph: compiling it takes seconds, not minutes
        **{"train.compile": True, "train.batch_size": 64},
        **{"train.scaling.workers": 2, "train.scaling.use_gpu": False},
    )

    result = run(["dvc", "repro", "train"], repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "compiled the training step in" in result.stdout + result.stderr

    (epoch,) = read_json(repo / "outputs/train/history.json")["epochs"]
    assert epoch["compile_seconds"] > 0 and epoch["images_per_second"] > 0
    # Throughput leaves the compiling step out: the epoch took longer than its images at that rate.
    assert epoch["epoch_seconds"] > epoch["compile_seconds"]
    state = load_checkpoint(repo / "outputs/train/model.pt")["model"]
    params = load_params(repo / "params.yaml").with_dataset(read_json(repo / "data/dataset.json"))
    expected = BoostNet.from_params(params).state_dict()
    assert state.keys() == expected.keys()  # no `_orig_mod.` or `module.` prefixes
    assert all(state[k].shape == v.shape for k, v in expected.items())
    assert epoch["val_mean_top1"] > 30  # it learned (chance is 10 %) in 15 steps
